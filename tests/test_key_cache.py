"""KeyCache: verified keys answered from memory, dropped through the change log (SQLite and PostgreSQL).

Two caches over one database stand for two serving workers (or replicas); a fake clock moves
time past the poll interval instead of sleeping.
"""

from __future__ import annotations

import pytest

from adapters.key_cache import UNKNOWN, KeyCache
from adapters.keys import KeyStore
from adapters.registry import Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingKeys(KeyStore):
    """The real KeyStore, counting the database lookups it makes."""

    lookups = 0

    def authenticate(self, secret: object) -> str | None:
        self.lookups += 1
        return super().authenticate(secret)


@pytest.fixture()
def world(database_url):
    registry = Registry(database_url)
    for t in ("acme", "globex"):
        registry.create_tenant(t)
    keys = CountingKeys(registry.engine)
    clock = Clock()
    here = KeyCache(keys, registry, poll_seconds=0.25, ttl_s=60, clock=clock)
    there = KeyCache(KeyStore(registry.engine), registry, poll_seconds=0.25, ttl_s=60, clock=clock)
    return registry, keys, clock, here, there


def test_known_keys_are_answered_from_memory(world):
    registry, keys, clock, here, _ = world
    _, secret = keys.create("acme")
    assert here.peek(secret) is UNKNOWN  # never polled, never seen
    assert here.authenticate(secret) == "acme" and keys.lookups == 1
    assert here.peek(secret) == "acme"
    for _ in range(50):
        assert here.authenticate(secret) == "acme"
    assert keys.lookups == 1 and here.hits >= 50
    clock.now += 61  # past the ttl: asked again
    assert here.peek(secret) is UNKNOWN
    assert here.authenticate(secret) == "acme" and keys.lookups == 2


def test_bad_keys_cost_one_lookup_and_garbage_none(world):
    registry, keys, clock, here, _ = world
    bad = "tk-" + "x" * 40
    assert here.authenticate(bad) is None and here.authenticate(bad) is None
    assert keys.lookups == 1 and here.peek(bad) is None
    for garbage in ("", "nope", "tk-" + "y" * 500):
        assert here.peek(garbage) is None and here.authenticate(garbage) is None
    assert keys.lookups == 1


def test_revocation_reaches_every_cache_within_one_poll(world):
    registry, keys, clock, here, there = world
    key_id, secret = keys.create("acme")
    _, other = keys.create("globex")
    assert here.authenticate(secret) == "acme" and there.authenticate(secret) == "acme"
    assert there.authenticate(other) == "globex"
    keys.revoke("acme", key_id)
    here.forget_tenant("acme")  # the revoking worker forgets at once
    assert here.authenticate(secret) is None
    # another worker: still remembered until its next poll is due, then the change log drops it
    assert there.peek(secret) == "acme"
    clock.now += 0.3
    assert there.peek(secret) is UNKNOWN
    assert there.authenticate(secret) is None
    assert there.authenticate(other) == "globex"  # other tenants' keys stay cached
    assert there.peek(other) == "globex"


def test_deleting_a_tenant_drops_its_keys_everywhere(world):
    registry, keys, clock, here, there = world
    _, secret = keys.create("globex")
    assert there.authenticate(secret) == "globex"
    registry.delete_tenant("globex")
    clock.now += 0.3
    assert there.authenticate(secret) is None
