"""Tenants' API keys, stored hashed: the secret itself is shown once, at creation, and never kept.

A key is ``"tk-"`` followed by 40 URL-safe random characters (240 bits from ``secrets``). Only
its sha256 is stored. A fast, unsalted hash is the right choice here, unlike for passwords:
the secret is high-entropy random data, so there is no dictionary to try and a slow KDF would
add nothing but latency to every request; the hash being deterministic also lets
``authenticate`` find the key with one indexed lookup. (A timing-safe compare is not needed
either: the lookup is by hash, so timing reveals nothing about the secret.)

Revocation takes effect at once: every ``authenticate`` asks the database, and ``revoke``
appends a ``key_revoked`` entry to the registry's change log so that processes that cache
verified keys (``adapters.key_cache``) drop the tenant's keys at their next poll. The one exception
is a database outage: then a key this process verified within the last ``offline_grace_s``
seconds is still accepted (so predictions for resident adapters keep working while the
database is down); any other key gets ``DatabaseUnavailableError`` (503: we cannot tell), never
a 401. A key revoked in this process is forgotten at once; a revocation made elsewhere cannot
have happened during the outage from this process's point of view, and the grace bounds the
window if only this process lost the database. Keys belong to a tenant row and go with it
(``ON DELETE CASCADE``). Another tenant's key id is "not found", never "forbidden". Each write
(``create``, ``revoke``) is one ``adapters.schema.transaction``: rerun when PostgreSQL picks it
as a deadlock or serialization victim.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from adapters.errors import DatabaseUnavailableError, NotFoundError
from adapters.names import validate_name
from adapters.registry.changelog import log_change
from adapters.registry.core import tenant_id
from adapters.schema import api_keys, configure_engine, create_schema, read_only, tenants, transaction, utcnow

SECRET_PREFIX = "tk-"
SECRET_RANDOM_CHARS = 40  # token_urlsafe(30) gives exactly 40 characters
PREFIX_CHARS = 8
MAX_SECRET_CHARS = 256  # anything longer cannot be ours: refuse before hashing
_KEY_ID = re.compile(r"key-[0-9a-f]{24}")
OFFLINE_GRACE_S = 300.0
MAX_REMEMBERED_KEYS = 100_000


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_RANDOM_CHARS * 3 // 4)


class KeyStore:
    def __init__(self, engine: Engine, *, migrate: bool = True, offline_grace_s: float = OFFLINE_GRACE_S) -> None:
        configure_engine(engine)
        if migrate:
            create_schema(engine)
        self.engine = engine
        self._read = read_only(engine)
        self.offline_grace_s = offline_grace_s
        # key hash -> (tenant, monotonic time it was last verified): used only in an outage.
        self._verified: dict[str, tuple[str, float]] = {}
        self._verified_lock = threading.Lock()

    def create(self, tenant: str) -> tuple[str, str]:
        """A new key for ``tenant``: returns ``(key_id, secret)``; the secret is not kept."""
        validate_name(tenant, "tenant")
        secret = new_secret()
        key_id = "key-" + secrets.token_hex(12)
        transaction(self.engine, lambda conn: conn.execute(insert(api_keys).values(
            id=key_id, tenant_id=tenant_id(conn, tenant), key_hash=hash_secret(secret),
            prefix=secret[:PREFIX_CHARS], created_at=utcnow(), revoked_at=None,
        )))
        return key_id, secret

    def get(self, tenant: str, key_id: str) -> ApiKey:
        validate_name(tenant, "tenant")
        with self._read.connect() as conn:
            return _record(tenant, _row(conn, tenant, key_id))

    def authenticate(self, secret: object) -> str | None:
        """The tenant a live key belongs to, or None (unknown, revoked, malformed)."""
        if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX) or len(secret) > MAX_SECRET_CHARS:
            return None
        digest = hash_secret(secret)
        try:
            with self._read.connect() as conn:
                name = conn.scalar(
                    select(tenants.c.name)
                    .join(api_keys, api_keys.c.tenant_id == tenants.c.id)
                    .where(api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None))
                )
        except DatabaseUnavailableError:
            known = self._verified.get(digest)
            if known is not None and time.monotonic() - known[1] <= self.offline_grace_s:
                return known[0]
            raise
        with self._verified_lock:
            if name is None:
                self._verified.pop(digest, None)
                return None
            if len(self._verified) >= MAX_REMEMBERED_KEYS:
                self._verified.clear()  # rare; only shortens what an outage can serve
            self._verified[digest] = (str(name), time.monotonic())
        return str(name)

    def revoke(self, tenant: str, key_id: str) -> ApiKey:
        """Revoke one of ``tenant``'s keys (idempotent); NotFoundError if it is not theirs."""
        validate_name(tenant, "tenant")
        row = transaction(self.engine, lambda conn: _revoke(conn, tenant, key_id))
        with self._verified_lock:
            self._verified.pop(row.key_hash, None)
        return _record(tenant, row)

    def list(self, tenant: str) -> list[ApiKey]:
        """Every key of ``tenant`` (revoked ones too), oldest first; never the secret."""
        validate_name(tenant, "tenant")
        with self._read.connect() as conn:
            rows = conn.execute(
                select(api_keys).where(api_keys.c.tenant_id == tenant_id(conn, tenant))
                .order_by(api_keys.c.created_at, api_keys.c.id)
            ).all()
        return [_record(tenant, r) for r in rows]


def _row(conn: Connection, tenant: str, key_id: object) -> Any:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise NotFoundError(f"key {str(key_id)[:60]!r} not found", param="key_id")
    row = conn.execute(
        select(api_keys).join(tenants, tenants.c.id == api_keys.c.tenant_id)
        .where(tenants.c.name == tenant, api_keys.c.id == key_id)
    ).first()
    if row is None:
        raise NotFoundError(f"key {key_id!r} not found", param="key_id")
    return row


def _revoke(conn: Connection, tenant: str, key_id: object) -> Any:
    row = _row(conn, tenant, key_id)
    if row.revoked_at is None:
        conn.execute(update(api_keys).where(api_keys.c.id == row.id).values(revoked_at=utcnow()))
        log_change(conn, tenant, None, "key_revoked")
        row = _row(conn, tenant, key_id)
    return row


def _record(tenant: str, row: Any) -> ApiKey:
    m = row._mapping
    return ApiKey(id=m["id"], tenant=tenant, prefix=m["prefix"], created_at=m["created_at"],
                  revoked_at=m["revoked_at"])
