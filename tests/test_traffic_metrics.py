"""BentoML's per-request traffic metrics are not written for ``/v1/`` paths (their series were
dropped from ``/metrics`` anyway), and still are for every other path
(``service.traffic_metrics``); the served process carries the forward-pass thread counter."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx

from adapters.base import load_base
from adapters.peft_format import export_peft, zip_files
from adapters.synthetic import random_artifact
from service.traffic_metrics import ApiRoutesUnmetered, install
from tests.service_fixture import Served


def test_api_paths_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    middleware = ApiRoutesUnmetered(app)
    asyncio.run(middleware({"type": "http", "path": "/v1/predict", "method": "POST"}, None, None))
    assert seen == ["/v1/predict"]
    assert not middleware._is_setup  # BentoML's metrics were never even created for it


def test_install_replaces_bentomls_middleware_where_it_is_looked_up() -> None:
    from bentoml._internal.server.http import instruments

    install()
    install()  # idempotent
    assert instruments.RunnerTrafficMetricsMiddleware is ApiRoutesUnmetered
    assert issubclass(ApiRoutesUnmetered, instruments.RunnerTrafficMetricsMiddleware.__mro__[1])


def test_served_metrics(served: Served) -> None:
    with served.client(served.admin_key) as admin:
        assert admin.get("/v1/tenants").status_code == 200
        r = admin.post("/v1/tenants", json={"name": "metered"})
        assert r.status_code == 201, r.text
    spec = load_base(str(served.model_dir)).spec
    with served.client(r.json()["api_key"]) as c:
        data = zip_files(export_peft(random_artifact(spec, seed=3, n_labels=2), spec))
        assert c.post("/v1/adapters/clf/import", files={"file": ("a.zip", data, "application/zip")}).status_code == 201
        assert c.post("/v1/predict", json={"adapter": "clf", "inputs": ["one pass"]}).status_code == 200
    assert httpx.get(f"{served.url}/docs").status_code == 200
    text = httpx.get(f"{served.url}/metrics").text
    bentoml_series = re.findall(r'^bentoml_\w+request_total\{[^}]*endpoint="([^"]+)"', text, re.M)
    assert "/docs" in bentoml_series  # other paths are metered by BentoML as before
    assert not [e for e in bentoml_series if e.startswith("/v1/")]
    assert 'tailor_http_requests_total{endpoint="/v1/tenants",method="GET",status="200"}' in text
    # the threads each forward pass ran with (a pass may borrow idle workers' cores)
    assert re.search(r'^tailor_forward_threads_total\{task="text-classification",threads="[1-9]\d*"\} [1-9]', text, re.M)
