"""BentoML's request timeout, without its leak: ``ResponseStartTimeout`` and ``install()``.

BentoML (1.4.39) wraps every request of a service in its ``TimeoutMiddleware``
(``traffic.timeout``, 300 s here): a timer that answers 504 when the response has not started
in time. It never cancels that timer. Each request's timer stays in the event loop for the
whole timeout, holding a copy of the request's context, and through it the ASGI ``receive`` of
uvicorn's request cycle with any body bytes the app did not read (a request refused before its
body was read, such as a 429 or a 401 at ``service.gate``, keeps its whole body). A worker thus
keeps about ``rate x timeout`` finished requests: the soak's hostile tenant (~240 requests/s
per worker, most refused at the gate, bodies up to 200 KB) grew each serving worker from
~0.9 GB to ~2.7 GB in ten minutes; one flood of 100 KB bodies refused with 429 kept ~100 KB
per request.

``ResponseStartTimeout`` keeps BentoML's contract (a request whose response has not started
after ``timeout`` seconds is cancelled and answered 504 ``{"error": "Not able to process the
request in N seconds"}``; a response that has started, a stream say, is never cut) and
forgets the request when it ends: its timer is cancelled then, and it runs in an empty context,
so even a cancelled timer waiting in the loop's queue holds nothing of the request. The app
runs in the request's own task (no second task per request, as BentoML made); the timer
cancels that task, and the cancellation is taken back (``Task.uncancel``) when it was only
ours.

``install()`` (called by ``service.service`` before BentoML builds its app) puts it where
BentoML looks the class up when it builds a service's middleware stack; it fails loudly if
that place is gone, rather than leaving the leak in silently.
"""

from __future__ import annotations

import asyncio
import contextvars

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ResponseStartTimeout:
    """ASGI middleware: 504 when no response has started ``timeout`` seconds after the request."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        assert task is not None
        started = expired = False

        def expire() -> None:
            nonlocal expired
            if not started:
                expired = True
                task.cancel()

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        timer = asyncio.get_running_loop().call_later(self.timeout, expire, context=contextvars.Context())
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:
                raise  # not (only) ours: the server is stopping or the client left
            if not started:
                response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                        status_code=504)
                await response(scope, receive, send)
        finally:
            timer.cancel()


def install() -> None:
    """Serve every BentoML service of this process with ``ResponseStartTimeout`` in place of
    BentoML's ``TimeoutMiddleware`` (looked up in its module when the app is built)."""
    from bentoml._internal.server.http import traffic

    if not isinstance(getattr(traffic, "TimeoutMiddleware", None), type):
        raise RuntimeError("bentoml._internal.server.http.traffic.TimeoutMiddleware is gone: check that "
                           "service.request_timeout still replaces BentoML's request timeout")
    traffic.TimeoutMiddleware = ResponseStartTimeout  # type: ignore[misc,assignment]
