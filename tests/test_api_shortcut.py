"""``service.api_shortcut.direct_app``: ``/v1/`` requests skip BentoML's layers only when every
layer between is one that does nothing for them; the request timeout stays. And in the served
process the shortcut is taken (its log line says so) while predict still answers."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, Router

from service.api_shortcut import direct_app
from service.request_timeout import ResponseStartTimeout
from tests.service_fixture import Served


async def _api(scope: Any, receive: Any, send: Any) -> None:
    await PlainTextResponse(f"api {scope['path']} {scope['app_root_path']!r}")(scope, receive, send)


def _ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


class Unknown:  # e.g. BentoML's access log, CORS, a service's own middleware
    def __init__(self, app: Any) -> None:
        self.app = app


def bentoml_like(*, extra: bool = False, routes_ahead: tuple[str, ...] = ("/healthz", "/metrics"),
                 timeout: bool = True) -> Any:
    from _bentoml_impl.server.app import ContextMiddleware

    router = Router(routes=[*(Route(p, _ok) for p in routes_ahead), Mount("/", app=_api)])
    node: Any = ContextMiddleware(ExceptionMiddleware(router), context=None)  # type: ignore[arg-type]
    if extra:
        node = Unknown(node)
    return ResponseStartTimeout(node, 7.0) if timeout else node


def call(app: Any, path: str) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_stack_of_known_layers_goes_straight_to_the_mounted_app_under_the_timeout() -> None:
    direct = direct_app(bentoml_like())
    assert direct is not None
    assert isinstance(direct.app, ResponseStartTimeout) and direct.app.timeout == 7.0
    assert call(direct, "/v1/predict") == (200, b"api /v1/predict ''")


def test_any_other_stack_keeps_every_layer() -> None:
    assert direct_app(bentoml_like(extra=True)) is None  # a layer it does not know
    assert direct_app(bentoml_like(timeout=False)) is None  # no request timeout to keep
    assert direct_app(bentoml_like(routes_ahead=("/healthz", "/v1/x"))) is None  # BentoML owns a /v1/ path
    assert direct_app(_api) is None


def test_served_predict_takes_the_shortcut(served: Served) -> None:
    with served.client(served.admin_key) as admin:
        assert admin.get("/v1/tenants").status_code == 200
    assert "/v1/ requests go straight to the API app" in served.log_tail(400)
