"""``/v1/`` requests skip the layers of BentoML's stack that do nothing for them: ``direct_app``.

BentoML (1.4.39) serves a service's mounted ASGI app (ours, ``service.app``, at ``/``) behind its
own Starlette app: its error middleware, the traffic metrics (``service.traffic_metrics``: not
written for ``/v1/``), OpenTelemetry (``/v1/`` excluded unless ``TAILOR_TRACING=1``), the request
timeout (``service.request_timeout``), a context middleware (a ``Request`` object and two context
variables per request, for ``bentoml.Context``, which our routes never read), an exception
middleware (for BentoML's own routes), then its router, whose mount at ``/`` matches a path only
after trying it against every route of our app. About 0.2 ms of a lone predict's ~2 ms outside
the forward pass on the 2-core box.

``direct_app(chain)`` looks at the stack below the traffic-metrics middleware once and, when it
holds only those layers (each of a known class, OpenTelemetry with ``/v1/`` excluded, no
access log, no concurrency limit, no CORS, no middleware of the service's own), returns our app
under the same request timeout: a ``/v1/`` request then goes from the traffic-metrics
middleware straight to it. Any other stack (an access log asked for, tracing on, a BentoML
that builds it differently) returns None and every request takes BentoML's whole stack, as
before. Nothing under ``/v1/`` is BentoML's: the routes ahead of the mount are checked to hold
no such path.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Mount, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from service.request_timeout import ResponseStartTimeout

API_PREFIX = "/v1/"


def _skippable_classes() -> tuple[type, ...]:
    from _bentoml_impl.server.app import ContextMiddleware

    return (ContextMiddleware, ExceptionMiddleware)


def _traced(node: Any) -> bool:
    """Whether an OpenTelemetry middleware would trace a ``/v1/`` request."""
    excluded = getattr(node, "excluded_urls", None)
    return excluded is None or not excluded.url_disabled(f"http://localhost{API_PREFIX}predict")


def direct_app(chain: ASGIApp) -> ASGIApp | None:
    """Our app under the request timeout, reached without BentoML's other layers, when the
    stack from ``chain`` down is one whose layers do nothing for ``/v1/``; else None."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    skippable = _skippable_classes()
    node: Any = chain
    timeout: ResponseStartTimeout | None = None
    while not isinstance(node, Router):
        if type(node) is OpenTelemetryMiddleware:
            if _traced(node):
                return None
        elif type(node) is ResponseStartTimeout:
            if timeout is not None:
                return None
            timeout = node
        elif type(node) not in skippable:
            return None  # an access log, a concurrency limit, CORS, a service middleware: keep them all
        node = getattr(node, "app", None)
        if node is None:
            return None
    if timeout is None:
        return None
    mounted = _root_mount(node)
    return None if mounted is None else _Direct(ResponseStartTimeout(mounted, timeout.timeout))


def _root_mount(router: Router) -> ASGIApp | None:
    """The app mounted at ``/``, when no route ahead of it could take a ``/v1/`` path."""
    for route in router.routes:
        if isinstance(route, Mount) and route.path == "":
            return route.app
        path = getattr(route, "path", None)
        if not isinstance(path, str) or path.startswith(API_PREFIX.rstrip("/")) or isinstance(route, Mount) \
                and API_PREFIX.startswith(path + "/"):
            return None
    return None


class _Direct:
    """The mounted app, given the scope keys BentoML's mount at ``/`` would have added."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("app_root_path", scope.get("root_path", ""))
        scope.setdefault("path_params", {})
        await self.app(scope, receive, send)
