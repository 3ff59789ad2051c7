"""The FastAPI app the BentoML service mounts at ``/``: routes, docs, limits, metrics, errors.

``create_app(state)`` builds it; ``state`` may arrive later (``app.state.tailor = ...``) since
BentoML needs the app when the service class is defined and the state is built in the
service's ``__init__``. BentoML keeps its own ``/healthz``, ``/livez``, ``/readyz`` and
``/metrics`` (they match before the mounted app); everything else is ours, including JSON
404/405 for unknown routes and the OpenAPI docs at ``/docs`` (assets served locally: the
machines running this may have no internet).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.console_routes import mount_console
from service.errors import error_response
from service.gate import TenantGate
from service.jobs_routes import router as jobs_router
from service.openai_routes import router as openai_router
from service.predict_route import install as install_predict_route
from service.routes import router
from service.schemas import ErrorResponse
from service.settings import MIB, Settings
from service.state import TailorState

log = logging.getLogger("tailor.service")

API_DESCRIPTION = """\
One frozen base model per task, many tenants: each tenant classifies text or images through its
own LoRA adapters. Send `Authorization: Bearer <key>`: the admin key for `/v1/tenants`, a tenant's key
for everything else. Errors are `{"error": {"code", "message", "param", "type"}}` (OpenAI's shape). Text
generation (when served) speaks OpenAI's API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
"""
_UPLOAD_PATHS = re.compile(r"^/v1/(files|adapters/[^/]+/import)/?$")
_PREDICT_PATH = re.compile(r"^/v1/predict/?$")
# documented on every route (instead of FastAPI's default 422 body, which this API never sends)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "a client error"},
    "5XX": {"model": ErrorResponse, "description": "not ready (503) or an internal error (500)"},
}
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _swagger_assets() -> Path | None:
    try:
        import bentoml._internal.server as bentoml_server  # swagger-ui ships inside bentoml
    except ImportError:  # pragma: no cover
        return None
    path = Path(bentoml_server.__file__).parent / "static_content"
    return path if (path / "swagger-ui-bundle.js").is_file() else None


class PayloadTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the {limit} byte limit")


def body_limit(settings: Settings | None, path: str) -> int:
    """The largest body a request to ``path`` may have: ``max_upload_bytes`` for uploads,
    ``max_predict_bytes`` for predict (room for the image limits), else ``max_body_bytes``."""
    if settings is None:  # the service is starting: every /v1 route answers 503
        return 10 * MIB
    if _UPLOAD_PATHS.match(path):
        return settings.max_upload_bytes
    if _PREDICT_PATH.match(path):
        return settings.max_predict_bytes
    return settings.max_body_bytes


class BodyLimitMiddleware:
    """413 for bodies over the route's limit: by Content-Length up front, else while streaming."""

    def __init__(self, app: ASGIApp, get_settings: Any) -> None:
        self.app, self.get_settings = app, get_settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = body_limit(self.get_settings(), scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                response = error_response(413, "payload_too_large",
                                          f"request body is larger than the {limit} byte limit",
                                          headers={"Connection": "close"})
                return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class MetricsMiddleware:
    """Requests and latency by route template (``/v1/adapters/{name}``) and status."""

    def __init__(self, app: ASGIApp, get_state: Any) -> None:
        self.app, self.get_state = app, get_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: TailorState | None = self.get_state()
        if scope["type"] != "http" or state is None:
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            if endpoint == "/{path:path}":
                endpoint = "unmatched"
            m = state.metrics
            m.requests.labels(endpoint, scope["method"], str(status)).inc()
            m.latency.labels(endpoint, scope["method"]).observe(time.perf_counter() - t0)


class WorkerHeaderMiddleware:
    """``X-Tailor-Worker: <pid>`` on every response: which serving worker answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-tailor-worker", str(os.getpid()).encode())]
            await send(message)

        await self.app(scope, receive, tagged)


def create_app(state: TailorState | None = None) -> FastAPI:
    app = FastAPI(title="Tailor", version="0.1.0", description=API_DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.tailor = state

    def settings() -> Settings | None:
        return app.state.tailor.settings if app.state.tailor is not None else None

    app.add_middleware(BodyLimitMiddleware, get_settings=settings)
    app.add_middleware(TenantGate, get_state=lambda: app.state.tailor)  # before the body is read
    app.add_middleware(MetricsMiddleware, get_state=lambda: app.state.tailor)
    app.add_middleware(WorkerHeaderMiddleware)
    errors.install(app)
    app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(jobs_router, responses=ERROR_RESPONSES)
    app.include_router(openai_router, responses=ERROR_RESPONSES)  # /v1/chat/completions, /v1/completions, /v1/models

    assets = _swagger_assets()
    if assets is not None:
        app.mount("/docs/static", StaticFiles(directory=assets), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if assets is None:  # falls back to the CDN
            return get_swagger_ui_html(openapi_url="/openapi.json", title="Tailor API")
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="Tailor API", swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css", swagger_favicon_url="/docs/static/favicon-light-32x32.png",
        )

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/docs")

    mount_console(app)  # the web console at /ui (before the catch-all below)

    # Last: every other path is a JSON 404 (or 405 when the path exists with other methods).
    known = [r for r in (*router.routes, *jobs_router.routes, *openai_router.routes)
             if isinstance(getattr(r, "methods", None), set)]

    @app.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    def unknown(request: Request, path: str) -> JSONResponse:
        probe = {"type": "http", "path": request.url.path, "method": "", "root_path": ""}
        allowed = sorted({m for r in known if r.matches(probe)[0] != Match.NONE for m in r.methods})
        if allowed:
            return error_response(405, "method_not_allowed",
                                  f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}",
                                  headers={"Allow": ", ".join(allowed)})
        return error_response(404, "not_found", f"no route {request.method} {request.url.path}")

    build_routes(app)
    install_predict_route(app)  # first: POST /v1/predict for a tenant the gate resolved
    return app


def build_routes(app: FastAPI) -> None:
    """Build every included route's request-time context now, not on the first request.

    FastAPI (0.16x) builds the routes of an included router lazily, on the first request that
    reaches them: each route's pydantic fields and dependency tree, measured at 0.1-0.4 s on
    this box, paid by every worker's first request (after a start, a restart, a scale-up).
    The builds are cached by FastAPI, keyed by the routes' version, so this only moves them.
    A FastAPI without these methods has nothing to build.
    """
    for route in app.router.routes:
        for name in ("effective_candidates", "effective_low_priority_routes"):
            build = getattr(route, name, None)
            if callable(build):
                build()
