"""API keys on SQLite and PostgreSQL: shown once, stored hashed, revocable at once, per tenant."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from adapters.errors import NotFoundError
from adapters.keys import KeyStore
from adapters.registry import Registry
from adapters.schema import api_keys


@pytest.fixture()
def world(database_url):
    registry = Registry(database_url)
    for t in ("acme", "globex"):
        registry.create_tenant(t)
    return registry, KeyStore(registry.engine)


def test_create_and_authenticate(world):
    registry, keys = world
    key_id, secret = keys.create("acme")
    assert secret.startswith("tk-") and len(secret) == 43
    assert keys.authenticate(secret) == "acme"
    other_id, other = keys.create("globex")
    assert other != secret and other_id != key_id
    assert keys.authenticate(other) == "globex"
    for bad in ("", "tk-", secret[:-1], secret + "x", "x" * 10_000, None, 42, secret.upper()):
        assert keys.authenticate(bad) is None


def test_only_the_hash_is_stored(world):
    registry, keys = world
    key_id, secret = keys.create("acme")
    with registry.engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in {str(v) for v in row}
    assert row.prefix == secret[:8]
    listed = keys.list("acme")
    assert [k.id for k in listed] == [key_id]
    assert listed[0].prefix == secret[:8] and listed[0].revoked_at is None
    assert secret not in repr(listed)


def test_revoke_is_immediate_and_per_tenant(world):
    registry, keys = world
    key_id, secret = keys.create("acme")
    keep_id, keep = keys.create("acme")
    with pytest.raises(NotFoundError):
        keys.revoke("globex", key_id)  # not theirs: not found, not forbidden
    with pytest.raises(NotFoundError):
        keys.revoke("acme", "key-000000000000000000000000")
    with pytest.raises(NotFoundError):
        keys.revoke("acme", "../etc")
    assert keys.authenticate(secret) == "acme"
    revoked = keys.revoke("acme", key_id)
    assert revoked.revoked_at is not None and not revoked.active
    assert keys.authenticate(secret) is None
    assert keys.authenticate(keep) == "acme"
    again = keys.revoke("acme", key_id)  # idempotent: keeps the first revocation time
    assert again.revoked_at == revoked.revoked_at
    states = {k.id: k.active for k in keys.list("acme")}
    assert states == {key_id: False, keep_id: True}


def test_unknown_tenant_and_tenant_deletion(world):
    registry, keys = world
    with pytest.raises(NotFoundError):
        keys.create("nobody")
    with pytest.raises(NotFoundError):
        keys.list("nobody")
    _, secret = keys.create("globex")
    registry.delete_tenant("globex")
    assert keys.authenticate(secret) is None  # keys cascade with their tenant
