"""POST /v1/predict through ``service.predict_route.PredictFastRoute`` (a tenant the gate resolved
from memory) answers exactly as through FastAPI's route (a key this worker has not seen yet),
and its key checks are as strict: a revoked key, a wrong key, the admin key, another tenant's
adapter. Over real HTTP against the session's ``bentoml serve``.

A key's first request reaches FastAPI's route (``TenantGate`` cannot answer an unseen key from
memory and passes it on); once the key is cached, the gate resolves it and the fast route
answers. Each test sends the same requests on both sides of that and compares.
"""

from __future__ import annotations

import httpx
import pytest

from adapters.base import load_base
from service.app import create_app
from service.predict_route import PredictFastRoute
from tests.test_service_http import adapter_zip, assert_error, import_zip, new_tenant

TEXTS = ["good morning", "a dreadful film"]


@pytest.fixture(scope="module")
def ctx(served):  # noqa: F811
    """(the admin's client, the served base's spec)"""
    with served.client(served.admin_key) as admin:
        yield admin, load_base(str(served.model_dir)).spec


def tenant_with_adapter(served, ctx, seed: int) -> tuple[str, str]:
    admin, spec = ctx
    name, key = new_tenant(admin, "fast")
    with served.client(key) as c:
        assert import_zip(c, "clf", adapter_zip(spec, seed=seed)).status_code == 201
    return name, key


def fresh_key(admin, tenant: str) -> str:
    """A key no worker has seen yet: its first request goes to FastAPI's route."""
    r = admin.post(f"/v1/tenants/{tenant}/keys")
    assert r.status_code == 201, r.text
    return r.json()["api_key"]


def rounded(value: object) -> object:
    """Scores to 4 places: a forward pass on one or two torch threads may differ in the last bits."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def shape(r: httpx.Response) -> tuple[int, str, object]:
    return r.status_code, r.headers["content-type"], rounded(r.json())


def test_the_route_is_first_and_takes_only_post_predict() -> None:
    app = create_app()
    first = app.router.routes[0]
    assert isinstance(first, PredictFastRoute)
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "root_path": ""}
    assert first.matches(scope)[0].name == "FULL"
    for other in ({**scope, "method": "GET"}, {**scope, "path": "/v1/predictx"}, {**scope, "path": "/v1/adapters"}):
        assert first.matches(other)[0].name == "NONE", other


def test_answers_and_errors_match_fastapis_route(served, ctx) -> None:  # noqa: F811
    admin = ctx[0]
    name, _ = tenant_with_adapter(served, ctx, seed=11)
    requests = [
        {"json": {"adapter": "clf", "inputs": TEXTS}},
        {"json": {"adapter": "clf@1", "inputs": TEXTS[:1]}},
        {"json": {"adapter": "nope", "inputs": TEXTS}},  # 404
        {"json": {"adapter": "clf", "inputs": ["x"], "extra": 1}},  # 422 unknown field
        {"content": b'{"adapter": "clf", "inputs": ["\\ud800"]}',  # a lone surrogate: 422 naming inputs[0]
         "headers": {"content-type": "application/json"}},
        {"json": {"adapter": "clf"}},  # 422: neither inputs nor images
        {"content": b"{not json", "headers": {"content-type": "application/json"}},  # 400
        {"content": b"adapter=clf", "headers": {"content-type": "text/plain"}},  # 415
    ]
    statuses = []
    for req in requests:
        key = fresh_key(admin, name)
        with served.client(key) as c:
            first = c.post("/v1/predict", **req)  # unseen key: FastAPI's route
            second = c.post("/v1/predict", **req)  # cached key: the fast route
        assert shape(first) == shape(second), (req, first.text, second.text)
        statuses.append(second.status_code)
        if second.status_code == 200:
            assert second.json()["adapter"] == "clf" and len(second.json()["predictions"]) == len(req["json"]["inputs"])
            assert second.json()["version"] == 1
        else:
            assert_error(second, second.status_code)
    assert statuses == [200, 200, 404, 422, 422, 422, 400, 415]


def test_a_revoked_key_is_refused_at_once(served, ctx) -> None:  # noqa: F811
    admin = ctx[0]
    name, key = tenant_with_adapter(served, ctx, seed=12)
    with served.client(key) as c:
        for _ in range(3):  # cached by now: these go through the fast route
            assert c.post("/v1/predict", json={"adapter": "clf", "inputs": TEXTS}).status_code == 200
        key_id = admin.get(f"/v1/tenants/{name}/keys").json()[0]["key_id"]
        assert admin.delete(f"/v1/tenants/{name}/keys/{key_id}").status_code == 200
        assert_error(c.post("/v1/predict", json={"adapter": "clf", "inputs": TEXTS}), 401, "invalid_api_key")


def test_wrong_key_admin_key_and_another_tenants_adapter(served, ctx) -> None:  # noqa: F811
    admin = ctx[0]
    _, key_a = tenant_with_adapter(served, ctx, seed=13)
    _, key_b = new_tenant(admin, "fastb")  # no adapter 'clf'
    body = {"adapter": "clf", "inputs": TEXTS}
    with served.client() as anon:
        assert_error(anon.post("/v1/predict", json=body), 401, "missing_api_key")
        for _ in range(2):
            assert_error(anon.post("/v1/predict", json=body, headers={"Authorization": "Bearer tk-wrong"}),
                         401, "invalid_api_key")
        # the right secret under another scheme is no key at all, on either side of caching
        assert_error(anon.post("/v1/predict", json=body, headers={"Authorization": f"Basic {key_a}"}), 401)
    with served.client(key_a) as a:
        assert a.post("/v1/predict", json=body).status_code == 200
    with served.client(key_b) as b:
        for _ in range(3):  # B's key cached after the first: B never reaches A's adapter
            assert_error(b.post("/v1/predict", json=body), 404)
    for _ in range(2):
        assert_error(admin.post("/v1/predict", json=body), 403, "forbidden")
