"""The HTTP tests of ``test_service_http`` that exercise predictions, run again against a real
``bentoml serve`` with ``TAILOR_RUNTIME=onnx`` (text only: no image base to load). The torch
runtime runs them in ``test_service_http`` itself; here the same functions and fixtures are
reused, over a ``served`` of this module. Cost: one more service start (~10 s) plus the
tiny base's export (~3 s) and the reused tests (~5 s)."""

from __future__ import annotations

import json

import pytest

from tests.service_fixture import save_tiny_base, serving
from tests.test_service_http import (  # noqa: F401 - fixtures and tests run here under ONNX
    acme, admin, spec, test_bad_requests_are_4xx_json, test_concurrent_tenants_share_forward_passes,
    test_predict_matches_the_in_process_engine, test_unknown_and_foreign_adapters_are_404,
    test_versions_aliases_promote_rollback,
)

ONNX = {"TAILOR_RUNTIME": "onnx", "TAILOR_TASKS": "text-classification"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-onnx")
    model_dir = save_tiny_base(root / "model")
    with serving(root / "home", model_dir, ONNX) as s:
        yield s


def test_the_service_serves_on_onnx(served):
    log = (served.home / "serve.log").read_text(errors="replace")
    assert "serves on ONNX Runtime fp32" in log, served.log_tail()
    assert "serving on torch" not in log
    # one universal graph (built at start); target-set variants may be building beside it
    sidecars = [json.loads(f.read_text()) for f in (served.home / "graphs").glob("*.json")]
    assert [m["key"]["precision"] for m in sidecars if m["key"]["targets"] == "*"] == ["fp32"]
