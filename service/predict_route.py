"""``POST /v1/predict``: the answer, and a route that reaches it without FastAPI's per-request work.

``answer_predict(request, tenant, state)`` is the whole of predict once the caller is known: read
the rows (``service.predict_input``), check them, resolve the adapter, submit to the task's
micro-batcher, await the future, build the JSON. ``service.routes.predict`` (the FastAPI route,
which also documents the endpoint in ``/openapi.json``) calls it after its dependencies have
authenticated the key and taken the tenant's rate-limit token.

``PredictFastRoute`` (``install(app)`` puts it first in the app's routes) answers the same path
and method when ``service.gate.TenantGate`` already did that work for this request: the gate
authenticated the key from memory and took the tenant's token (``RATE_CHECKED`` in the scope's
state). It reads the key again and peeks the same ``KeyCache`` (a revocation seen since the gate
ran counts), and calls ``answer_predict`` with that tenant. FastAPI's routing through included
routers and its dependency resolution (``principal``, ``require_tenant``, ``get_state``; about
a third of a ms per request on the 2-core box) are skipped; the checks are the same ones, in
the same order, from the same memory. Every request the gate passed on unresolved (the admin
key, no key, a key not yet seen by this worker, a quota due to be re-read, the service still
starting) goes on to FastAPI's route, unchanged. Errors raised here are answered by the app's
exception handlers (``service.errors``) exactly as from the FastAPI route: the route runs inside
the app's exception middleware.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.errors import TenantBusyError
from service import ops
from service.errors import ApiError
from service.gate import RATE_CHECKED, bearer_token
from service.predict_input import read_predict
from service.state import TailorState

PATH = "/v1/predict"
_PASSED_ON = "tailor.predict_passed_on"  # scope key: the fast route gave this request to FastAPI's


async def answer_predict(request: Request, tenant: str, state: TailorState) -> JSONResponse:
    """The answer to a predict request of ``tenant`` (authenticated, its rate token taken)."""
    rows = await read_predict(request, state.settings.max_body_bytes, state.settings.max_predict_bytes)
    ops.check_rows(state, rows)
    if rows.task not in state.settings.tasks:  # says why: the adapter's task, or this one is not served
        await run_in_threadpool(ops.acquire, state, tenant, rows)
    engine, batcher = state.require_engine(rows.task), state.require_batcher(rows.task)
    with batcher.incoming():  # the batcher holds a forming batch only while requests are on the way
        # resident and resolved in memory: no thread hop; else the registry/store, off the loop
        hit = ops.acquire_resident(state, tenant, rows)
        resolved, loaded = hit or await run_in_threadpool(ops.acquire, state, tenant, rows)
        inputs = await run_in_threadpool(ops.decode_rows, state, engine, rows) if rows.field == "images" \
            else ops.decode_rows(state, engine, rows)  # texts: a cheap check, on the loop
        try:
            future = batcher.submit([(loaded, row) for row in inputs], tenant)
        except TenantBusyError as e:
            state.metrics.refused_rows.labels("queue_full").inc()
            raise ApiError(429, "tenant_queue_full", e.message,
                           headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
    preds = await asyncio.wrap_future(future)
    state.metrics.predicted(rows.task, tenant, len(preds))
    # Built here, not by FastAPI from the response_model (which still documents it): validating
    # and re-serialising this plain, already-typed dict cost a lone request ~3% of its loop time.
    return JSONResponse({
        "adapter": resolved.key.adapter, "version": resolved.key.version,
        "predictions": [{"label": p.label, "score": p.score, "scores": p.scores} for p in preds],
    })


def gate_tenant(scope: Scope, state: TailorState | None) -> str | None:
    """The tenant ``TenantGate`` authenticated and rate-checked for this request, if it did and
    the key still names that tenant now; None sends the request to FastAPI's route."""
    checked = (scope.get("state") or {}).get(RATE_CHECKED)
    if checked is None or state is None:
        return None
    token = bearer_token(scope)
    if token is None or state.key_cache.peek(token) != checked:
        return None
    return checked


class PredictFastRoute(BaseRoute):
    """``POST /v1/predict`` for requests the gate resolved; ``fallback`` (FastAPI's routing) for
    every other one. Not in the OpenAPI schema: FastAPI's route documents the endpoint."""

    path = path_format = PATH
    methods = {"POST"}
    include_in_schema = False

    def __init__(self, fallback: ASGIApp, get_state: Callable[[], TailorState | None]) -> None:
        self.fallback, self.get_state = fallback, get_state

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get(_PASSED_ON) \
                and get_route_path(scope) == PATH:
            return Match.FULL, {"route": self}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.get_state()
        tenant = gate_tenant(scope, state)
        if tenant is None or state is None:
            return await self.fallback(scope, receive, send)
        response = await answer_predict(Request(scope, receive, send), tenant, state)
        await response(scope, receive, send)


def install(app: FastAPI) -> None:
    """Put ``PredictFastRoute`` first in ``app``'s routes; the requests it does not take go
    through the app's routing again, which then passes it by (FastAPI's route answers)."""

    async def fallback(scope: Scope, receive: Receive, send: Send) -> None:
        scope[_PASSED_ON] = True
        await app.router.app(scope, receive, send)

    app.router.routes.insert(0, PredictFastRoute(fallback, lambda: app.state.tailor))
