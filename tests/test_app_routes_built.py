"""The app builds its routes when it is created, so a worker's first request does not pay for it.

FastAPI builds each included router's route contexts (pydantic fields, dependency trees) on the
first request that reaches them, 0.1-0.4 s here; ``service.app.build_routes`` does it in
``create_app``. Counted on FastAPI's own builder, through a real request.
"""

from __future__ import annotations

import fastapi.routing
import pytest
from fastapi.testclient import TestClient

from service.app import create_app


def test_routes_are_built_before_the_first_request(monkeypatch: pytest.MonkeyPatch) -> None:
    included = getattr(fastapi.routing, "_IncludedRouter", None)
    if included is None or not hasattr(included, "_build_effective_context"):
        pytest.skip("this FastAPI version builds no route contexts lazily")
    built: list[object] = []
    original = included._build_effective_context

    def counting(self, route):  # type: ignore[no-untyped-def]
        built.append(route)
        return original(self, route)

    monkeypatch.setattr(included, "_build_effective_context", counting)
    app = create_app()  # no state yet: /v1 routes answer 503, after routing
    at_start = len(built)
    assert at_start > 0
    with TestClient(app) as client:
        r = client.post("/v1/predict", json={"adapter": "clf", "inputs": ["hi"]},
                        headers={"Authorization": "Bearer tk-" + "x" * 40})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert len(built) == at_start  # the request found every route built
