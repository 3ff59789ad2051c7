"""BentoML's per-request traffic metrics, left out for the API routes: ``install()``.

BentoML (1.4.39) wraps every request in its ``RunnerTrafficMetricsMiddleware``: an in-progress
gauge raised and lowered, a request counter and a duration histogram, each labelled by the raw
path (one series per adapter name, job id and file id), and a last-request timestamp, all
written to prometheus-client's multiprocess files. For ``/v1/`` paths ``service.service``
drops those series from ``/metrics`` anyway (``Tailor.__metrics__``; ``tailor_http_*``, by
route template, count and time every request instead), so the work bought nothing: measured
with py-spy on a served worker under one closed-loop client, about a tenth of the event
loop's time per predict went to prometheus-client label look-ups and file writes, most of it
BentoML's.

``ApiRoutesUnmetered`` is BentoML's middleware that passes ``/v1/`` requests straight on (to our
app under the request timeout, when ``service.api_shortcut.direct_app`` finds the layers between
have nothing to do for them; else to the next layer); every other path (``/docs``, ``/ui``,
BentoML's own) is metered as before. ``install()``
(called by ``service.service`` before BentoML builds its app) puts it where BentoML looks the
class up when it builds a service's middleware stack; it fails loudly if that place is gone.
"""

from __future__ import annotations

import logging
from typing import Any

from bentoml._internal.server.http import instruments
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api_shortcut import API_PREFIX, direct_app

log = logging.getLogger("tailor.service")
_UNSEEN: Any = object()


class ApiRoutesUnmetered(instruments.RunnerTrafficMetricsMiddleware):
    _api: ASGIApp | None = _UNSEEN  # where /v1/ requests go: found on the first one (the stack is built by then)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            if self._api is _UNSEEN:
                self._api = direct_app(self.app)
                log.info("/v1/ requests %s", "go straight to the API app (service.api_shortcut)" if self._api
                         else "take BentoML's whole middleware stack")
            return await (self._api or self.app)(scope, receive, send)
        return await super().__call__(scope, receive, send)


def install() -> None:
    """Serve every BentoML service of this process with ``ApiRoutesUnmetered`` in place of
    BentoML's ``RunnerTrafficMetricsMiddleware`` (imported from its module when the app is built)."""
    if not isinstance(getattr(instruments, "RunnerTrafficMetricsMiddleware", None), type):
        raise RuntimeError("bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware is gone: "
                           "check that service.traffic_metrics still applies")
    if instruments.RunnerTrafficMetricsMiddleware is not ApiRoutesUnmetered:
        instruments.RunnerTrafficMetricsMiddleware = ApiRoutesUnmetered  # type: ignore[misc]
