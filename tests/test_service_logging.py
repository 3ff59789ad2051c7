"""What a served process logs: no line per request unless asked, and a readable start line.

BentoML's access log wrote one INFO line per request (a flood under load); it is off by
default and ``TAILOR_ACCESS_LOG=1`` turns it on. The start line said "base model model loaded"
(the base's folder is called ``model``). Real ``bentoml serve`` processes: the default one is the
session's ``served``, read while it runs; the one with the access log on is read after it has
exited, so every line it wrote is there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service_fixture import ADMIN_KEY, IMAGE_BASE_SEED, Served, save_tiny_base, start_served, stop_served

REQUESTS = 6


def served_log(home: Path, model_dir: Path, overrides: dict[str, str]) -> str:
    """The log of a served process that answered REQUESTS listings of tenants, then stopped."""
    s = start_served(home, model_dir, overrides)
    try:
        with s.client(ADMIN_KEY) as c:
            for _ in range(REQUESTS):
                assert c.get("/v1/tenants").status_code == 200
    finally:
        stop_served(s)
    return (home / "serve.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("logging") / "model")


def access_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "method=GET,path=/v1/tenants" in line]


def test_no_line_per_request_by_default_and_a_readable_start(served: Served) -> None:
    """On the session's server (default logging), read while it runs: an access line is written
    right after its response is sent, before the worker (one; its requests are answered in turn)
    answers the next request, so once the request after ours is answered any line of ours is in."""
    with served.client(ADMIN_KEY) as c:
        for _ in range(REQUESTS):
            assert c.get("/v1/tenants").status_code == 200
        assert c.get("/readyz").status_code == 200
    log = (served.home / "serve.log").read_text(errors="replace")
    assert access_lines(log) == []
    assert "loaded text-classification base model 'model' on " in log and "base model model" not in log
    assert f"loaded image-classification base model 'tiny-efficientnet-{IMAGE_BASE_SEED}' on " in log
    assert "ready: serving text-classification, image-classification" in log


def test_access_log_when_asked(tmp_path: Path, model_dir: Path) -> None:
    log = served_log(tmp_path / "home", model_dir, {"TAILOR_ACCESS_LOG": "1"})
    assert len(access_lines(log)) == REQUESTS, log[-3000:]
