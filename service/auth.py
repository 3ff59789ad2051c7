"""Who is calling: ``Authorization: Bearer <key>`` names the admin or exactly one tenant.

The tenant of a request comes only from its key, never from the body or the path. Missing,
unknown or revoked keys are 401; a tenant key on an admin route, or the admin key on a
tenant route, is 403. Tenant routes also take a token from the tenant's rate-limit bucket,
right after the key and before the body is used (a refused flood costs almost nothing).

These dependencies are ``async`` and answer from memory when they can (``KeyCache``: verified
keys, kept fresh from the registry's change log; the limiter's cached quotas), so a request
for a known key costs no database query and no thread hop. A revoked key is refused at once
by the worker that revoked it and within 0.25 s by every other worker and replica.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from adapters.key_cache import UNKNOWN

from service.errors import ApiError
from service.gate import RATE_CHECKED
from service.state import TailorState

bearer = HTTPBearer(auto_error=False, description="the admin key, or a tenant's API key (tk-...)")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Principal:
    admin: bool
    tenant: str | None = None


async def get_state(request: Request) -> TailorState:
    state = getattr(request.app.state, "tailor", None)
    if state is None:
        raise ApiError(503, "not_ready", "the service is starting; retry shortly", headers={"Retry-After": "2"})
    return state


async def principal(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(bearer),
    state: TailorState = Depends(get_state),
) -> Principal:
    if creds is None or not creds.credentials:
        raise ApiError(401, "missing_api_key",
                       "this route needs an API key: send 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    token = creds.credentials
    if hmac.compare_digest(token.encode("utf-8", "replace"), state.settings.admin_key.encode()):
        p = Principal(admin=True)
    else:
        tenant = state.key_cache.peek(token)
        if tenant is UNKNOWN:
            tenant = await run_in_threadpool(state.key_cache.authenticate, token)
        if tenant is None:
            raise ApiError(401, "invalid_api_key", "the API key is invalid or was revoked", headers=_CHALLENGE)
        p = Principal(admin=False, tenant=tenant)  # type: ignore[arg-type]
    request.state.principal = p
    return p


async def require_admin(p: Principal = Depends(principal)) -> Principal:
    if not p.admin:
        raise ApiError(403, "forbidden", "this route needs the admin key")
    return p


async def require_tenant(request: Request, p: Principal = Depends(principal),
                         state: TailorState = Depends(get_state)) -> str:
    if p.admin or p.tenant is None:
        raise ApiError(403, "forbidden", "this route needs a tenant's API key (the admin key acts on no tenant)")
    if getattr(request.state, RATE_CHECKED, None) == p.tenant:
        return p.tenant  # service.gate took this request's token before the body was read
    if state.limiter.needs_refresh(p.tenant):
        await run_in_threadpool(state.limiter.refresh, p.tenant)
    state.limiter.check(p.tenant)
    return p.tenant
