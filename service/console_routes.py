"""The web console: static files of ``service/console/`` served at ``/ui`` by the service itself.

``mount_console(app)`` adds ``/ui`` (a redirect to ``/ui/``) and the files under ``/ui/``
(``index.html`` for the directory; HTML, CSS and JavaScript modules, the vendored uPlot; no
build step); a missing file is a plain-text 404. It must run before the app's catch-all JSON
404 route. Every console response, a 404 included, carries ``SECURITY_HEADERS``: a
Content-Security-Policy that allows only same-origin scripts, styles, images (and
``data:``/``blob:`` images for previews) and connections, no inline script or style attribute,
no ``eval``, no framing; ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
``X-Frame-Options: DENY``.

The console has no routes of its own beyond these files: it reads and writes through the
public ``/v1`` API with the key the user signs in with (kept in the page's session storage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONSOLE_DIR = Path(__file__).with_name("console")
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate: a new release's files show at once
}
_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


class SecureHeaders:
    """Adds ``SECURITY_HEADERS`` to every response of the wrapped ASGI app (replacing any of
    the same name)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ours = {name for name, _ in _RAW_HEADERS}
                kept = [(n, v) for n, v in message.get("headers", ()) if n.lower() not in ours]
                message["headers"] = [*kept, *_RAW_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        except HTTPException as e:  # a missing file: answered here, so it carries the headers too
            response = PlainTextResponse(str(e.detail), status_code=e.status_code, headers=e.headers)
            await response(scope, receive, with_headers)


def mount_console(app: FastAPI) -> None:
    """Serve the console at ``/ui/`` (call before the catch-all route)."""

    @app.get("/ui", include_in_schema=False)
    def console_root() -> RedirectResponse:
        response = RedirectResponse("/ui/")
        response.headers.update(SECURITY_HEADERS)
        return response

    app.mount("/ui", SecureHeaders(StaticFiles(directory=CONSOLE_DIR, html=True)), name="console")
