"""Freshness off the request path: a background ``Freshener`` polls the change log (resolvers,
the key cache) and re-reads rate quotas, so requests answer from memory without polling.

Each test makes the request-path poll impossible (a poll interval of an hour, or a frozen
clock), so what the next "request" sees is only what the freshener's round brought.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.key_cache import UNKNOWN, KeyCache
from adapters.keys import KeyStore
from adapters.registry import Registry
from adapters.runtime.resolver import Freshener, Resolver
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from service.state import RateLimiter

HOUR = 3600.0


@pytest.fixture()
def world(tmp_path: Path) -> tuple[Catalog, Registry]:
    base = tiny_base(seed=1)
    url = f"sqlite:///{tmp_path}/r.db"
    catalog = Catalog(Registry(url), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    for seed in (1, 2):
        catalog.publish("acme", "clf", random_artifact(base.spec, seed=seed), promote=seed == 1, spec=base.spec)
    return catalog, Registry(url)  # the second registry: another process writing to the same database


def test_a_promotion_is_seen_by_the_next_request_after_the_freshener_runs(world) -> None:
    catalog, elsewhere = world
    resolver = Resolver(catalog.registry, poll_seconds=HOUR)  # requests never poll in this test
    freshener = Freshener([partial(resolver.refresh_ahead, HOUR)], interval=HOUR, start=False)
    assert resolver.resolve("acme", "clf", None).version == 1
    elsewhere.set_alias("acme", "clf", "prod", 2)  # a promotion made by another worker
    assert resolver.cached("acme", "clf", None).version == 1  # no poll due: memory still says 1
    freshener.run_once()  # the background round, not a request, polls the change log
    assert resolver.cached("acme", "clf", None) is None  # the stale entry is gone
    assert resolver.resolve("acme", "clf", None).version == 2  # the next request gets the new prod


def test_refresh_ahead_polls_only_when_the_next_poll_is_near(world) -> None:
    catalog, elsewhere = world
    resolver = Resolver(catalog.registry, poll_seconds=HOUR)
    resolver.resolve("acme", "clf", None)
    elsewhere.set_alias("acme", "clf", "prod", 2)
    resolver.refresh_ahead(1.0)  # an hour away: nothing to do
    assert resolver.cached("acme", "clf", None).version == 1
    resolver.refresh_ahead(HOUR)
    assert resolver.cached("acme", "clf", None) is None


def test_a_revoked_key_is_dropped_by_the_freshener_not_by_a_request(world) -> None:
    catalog, elsewhere = world
    frozen = [1000.0]
    keys = KeyStore(catalog.registry.engine)
    cache = KeyCache(keys, catalog.registry, poll_seconds=0.25, clock=lambda: frozen[0])
    key_id, secret = keys.create("acme")
    assert cache.authenticate(secret) == "acme" and cache.peek(secret) == "acme"
    KeyStore(elsewhere.engine).revoke("acme", key_id)  # revoked by another worker
    assert cache.peek(secret) == "acme"  # the clock is frozen: no poll is due yet
    Freshener([partial(cache.refresh_ahead, 0.25)], interval=HOUR, start=False).run_once()
    assert cache.peek(secret) is UNKNOWN  # forgotten: the next request asks the database
    assert cache.authenticate(secret) is None


class CountingRegistry:
    """Stands for the registry: counts quota reads."""

    def __init__(self, registry: Registry) -> None:
        self.registry, self.reads = registry, 0

    def get_tenant(self, name: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return self.registry.get_tenant(name)


def test_stale_quotas_are_re_read_in_the_background_not_before_a_request(world) -> None:
    catalog, _ = world
    counting = CountingRegistry(catalog.registry)
    limiter = RateLimiter(1000.0, counting)  # type: ignore[arg-type]
    assert limiter.needs_refresh("acme")  # never seen: read before its first request
    limiter.refresh("acme")
    assert counting.reads == 1
    for _ in range(5):
        limiter.check("acme")
    assert counting.reads == 1
    t = limiter._rates["acme"][1]
    assert not limiter.needs_refresh("acme", now=t + RateLimiter.QUOTA_TTL + 1)  # stale, still answered
    limiter.refresh_stale(now=t + 1)
    assert counting.reads == 1  # not stale yet
    limiter.refresh_stale(now=t + RateLimiter.QUOTA_TTL + 1)
    assert counting.reads == 2  # used since its read and stale: re-read off the request path
    limiter.refresh_stale(now=t + 2 * RateLimiter.QUOTA_TTL + 2)
    assert counting.reads == 2  # not used since: left alone
    assert limiter.needs_refresh("acme", now=t + RateLimiter.QUOTA_TTL + 1 + RateLimiter.QUOTA_MAX_AGE)


def test_a_failing_refresher_does_not_stop_the_others() -> None:
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("database down")

    freshener = Freshener([broken, lambda: calls.append("fine")], interval=HOUR, start=False)
    freshener.run_once()
    freshener.run_once()
    assert calls == ["broken", "fine", "broken", "fine"] and freshener.rounds == 2
    with pytest.raises(ValueError):
        Freshener([], interval=0)
