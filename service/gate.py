"""Cheap rejection at the door: a tenant over its rate, or a key known to be bad, is answered
before the request body is read, parsed or validated.

FastAPI reads and parses a body before it runs the route's dependencies, so a flood of
malformed or oversized bodies sent with a valid key would otherwise never meet the rate
limit, and every bad-key request would cost a route resolution. ``TenantGate`` is an ASGI
middleware in front of the routes that decides from memory only (``KeyCache.peek``, the
limiter's cached quotas), never blocking:

* a key this worker knows to belong to a tenant: the tenant's rate-limit token is taken here
  (429 with Retry-After when there is none) and the request is marked so the route's
  dependency does not take a second one;
* a key this worker knows to be bad: 401 at once;
* anything memory cannot answer (the admin key, no key, an unseen key, a quota due to be
  re-read): passed on unchanged, to the ordinary dependencies.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.key_cache import UNKNOWN
from service.errors import ApiError, error_response

RATE_CHECKED = "tailor_rate_checked"  # scope["state"] key: the gate took this request's token


class TenantGate:
    def __init__(self, app: ASGIApp, get_state: Any) -> None:
        self.app, self.get_state = app, get_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.get_state()
        if scope["type"] != "http" or state is None or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        token = bearer_token(scope)
        if token is None or hmac.compare_digest(token.encode("utf-8", "replace"),
                                                state.settings.admin_key.encode()):
            return await self.app(scope, receive, send)
        tenant = state.key_cache.peek(token)
        if tenant is None:
            response = error_response(401, "invalid_api_key", "the API key is invalid or was revoked",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if tenant is UNKNOWN or state.limiter.needs_refresh(tenant):
            return await self.app(scope, receive, send)
        try:
            state.limiter.check(tenant)
        except ApiError as e:
            response = error_response(e.status, e.code, e.message, e.param, e.headers or None)
            return await response(scope, receive, send)
        scope.setdefault("state", {})[RATE_CHECKED] = tenant
        await self.app(scope, receive, send)


def bearer_token(scope: Scope) -> str | None:
    """The request's ``Authorization: Bearer`` token, parsed as FastAPI's ``HTTPBearer`` parses it
    (the first such header; scheme case-insensitive; the token stripped), or None."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
