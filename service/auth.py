"""Who is calling: ``Authorization: Bearer <key>`` names the admin or exactly one tenant.

The tenant of a request comes only from its key, never from the body or the path. Missing,
unknown or revoked keys are 401; a tenant key on an admin route, or the admin key on a
tenant route, is 403. Tenant routes also take a token from the tenant's rate-limit bucket.
Key checks hit the database every time, so a revocation is effective at the next request.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError
from service.state import TailorState

bearer = HTTPBearer(auto_error=False, description="the admin key, or a tenant's API key (tk-...)")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Principal:
    admin: bool
    tenant: str | None = None


def get_state(request: Request) -> TailorState:
    state = getattr(request.app.state, "tailor", None)
    if state is None:
        raise ApiError(503, "not_ready", "the service is starting; retry shortly", headers={"Retry-After": "2"})
    return state


def principal(
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
        tenant = state.keys.authenticate(token)
        if tenant is None:
            raise ApiError(401, "invalid_api_key", "the API key is invalid or was revoked", headers=_CHALLENGE)
        p = Principal(admin=False, tenant=tenant)
    request.state.principal = p
    return p


def require_admin(p: Principal = Depends(principal)) -> Principal:
    if not p.admin:
        raise ApiError(403, "forbidden", "this route needs the admin key")
    return p


def require_tenant(p: Principal = Depends(principal), state: TailorState = Depends(get_state)) -> str:
    if p.admin or p.tenant is None:
        raise ApiError(403, "forbidden", "this route needs a tenant's API key (the admin key acts on no tenant)")
    state.limiter.check(p.tenant)
    return p.tenant
