"""ChangeFeed: one reader of the change log per process, shared by the key cache and the resolvers.

Deterministic: a fake clock moves time past the poll interval, and a poll "in flight" is a
background poll held inside ``change_seq`` by a gate; the gate opens exactly when a request
starts waiting for that poll (the feed's ``on_wait`` hook), so no test sleeps or races.
Regressions covered: a request that met a background poll in flight used to go around it to
the database (a 503 during an outage for a key that was cached and valid; a query where memory
was about to answer), and a poll delivering changes older than a cached entry used to drop it
(the outage test of tests/test_postgres.py was flaky from that).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapters.change_feed import ChangeFeed
from adapters.errors import DatabaseUnavailableError
from adapters.key_cache import UNKNOWN, KeyCache
from adapters.keys import KeyStore
from adapters.registry import Registry
from adapters.runtime.resolver import Resolver

POLL = 0.25


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """The registry's change log as the feed reads it, with a gate and an outage switch."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.down = False
        self.gated = False
        self.entered, self.gate = threading.Event(), threading.Event()
        self.seq_reads = 0

    def change_seq(self) -> int:
        self.seq_reads += 1
        if self.gated:
            self.gated = False
            self.entered.set()
            assert self.gate.wait(10), "nobody waited for the poll in flight"
        if self.down:
            raise DatabaseUnavailableError("the registry database is unavailable: test outage")
        return self.registry.change_seq()

    def changes_since(self, seq: int, limit: int = 1000):  # type: ignore[no-untyped-def]
        if self.down:
            raise DatabaseUnavailableError("the registry database is unavailable: test outage")
        return self.registry.changes_since(seq, limit=limit)


class Keys(KeyStore):
    """The real KeyStore, counting lookups, with an outage switch and no grace of its own."""

    lookups = 0
    down = False

    def authenticate(self, secret: object) -> str | None:
        self.lookups += 1
        if self.down:
            raise DatabaseUnavailableError("the registry database is unavailable: test outage")
        return super().authenticate(secret)


class CountingRegistry(Registry):
    resolves = 0

    def resolve(self, tenant, adapter, ref=None):  # type: ignore[no-untyped-def]
        self.resolves += 1
        return super().resolve(tenant, adapter, ref)


@pytest.fixture()
def world(tmp_path: Path):
    registry = CountingRegistry(f"sqlite:///{tmp_path}/r.db")
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    clock, source = Clock(), Source(registry)
    feed = ChangeFeed(source, poll_seconds=POLL, clock=clock, on_wait=source.gate.set)
    keys = Keys(registry.engine, offline_grace_s=0.0)
    return registry, clock, source, feed, keys, KeyCache(keys, registry, feed=feed, clock=clock)


def add_version(registry: Registry, tenant: str, adapter: str, version: int) -> None:
    registry.add_version(tenant, adapter, weights_key=f"w{version}", manifest_key=f"m{version}",
                         sha256=f"{version:064x}", nbytes=1, base_fingerprint="sha256:" + "0" * 64,
                         manifest={"kind": "text-classification"})


def background_poll(feed: ChangeFeed, source: Source) -> threading.Thread:
    """The Freshener's poll, started and held inside change_seq until someone waits for it."""
    source.gated = True
    thread = threading.Thread(target=feed.refresh_ahead, args=(POLL,), daemon=True)
    thread.start()
    assert source.entered.wait(10)
    return thread


def test_a_request_waits_for_the_poll_in_flight_and_answers_from_memory_in_an_outage(world) -> None:
    registry, clock, source, feed, keys, cache = world
    _, secret = keys.create("acme")
    assert cache.authenticate(secret) == "acme" and keys.lookups == 1
    source.down = keys.down = True  # the database goes away
    clock.now += POLL + 0.01  # a poll is due: memory alone may not answer
    assert cache.peek(secret) is UNKNOWN
    poll = background_poll(feed, source)
    # before the fix: the request went around the poll in flight to the KeyStore: a 503
    assert cache.authenticate(secret) == "acme"
    poll.join(10)
    assert keys.lookups == 1 and feed.waits == 1 and feed.offline
    assert cache.peek(secret) == "acme"  # offline: memory serves until the retry is due
    clock.now += 61  # past ttl_s: memory no longer vouches for the key; the KeyStore cannot tell
    with pytest.raises(DatabaseUnavailableError):
        cache.authenticate(secret)


def test_a_request_waits_for_the_poll_in_flight_instead_of_querying(world) -> None:
    registry, clock, source, feed, keys, cache = world
    _, secret = keys.create("acme")
    key_id, doomed = keys.create("globex")
    assert cache.authenticate(secret) == "acme" and cache.authenticate(doomed) == "globex"
    KeyStore(registry.engine).revoke("globex", key_id)  # revoked elsewhere: only the change log tells us
    clock.now += POLL + 0.01
    poll = background_poll(feed, source)
    assert cache.authenticate(secret) == "acme"  # answered by memory once the poll is in
    poll.join(10)
    assert keys.lookups == 2 and feed.waits == 1  # no query for a key memory knew
    assert cache.peek(doomed) is UNKNOWN  # the poll it waited for carried the revocation
    assert cache.authenticate(doomed) is None


def test_the_resolver_waits_for_the_poll_in_flight_too(world) -> None:
    registry, clock, source, feed, _, _ = world
    add_version(registry, "acme", "clf", 1)
    registry.set_alias("acme", "clf", "prod", 1)
    resolver = Resolver(registry, feed=feed)
    assert resolver.resolve("acme", "clf", None).version == 1 and registry.resolves == 1
    add_version(registry, "acme", "clf", 2)
    registry.set_alias("acme", "clf", "prod", 2)  # promoted elsewhere
    clock.now += POLL + 0.01
    assert resolver.cached("acme", "clf", None) is None  # a poll is due
    poll = background_poll(feed, source)
    assert resolver.resolve("acme", "clf", None).version == 2  # not v1 from memory around the poll
    poll.join(10)
    assert feed.waits == 1 and registry.resolves == 2
    source.down = True
    clock.now += POLL + 0.01
    poll = background_poll(feed, source)
    assert resolver.resolve("acme", "clf", None).version == 2  # the outage: memory, no query
    poll.join(10)
    assert resolver.offline and registry.resolves == 2
    with pytest.raises(DatabaseUnavailableError):
        resolver.resolve("acme", "never-seen", None)


def test_changes_older_than_an_entry_do_not_drop_it(world) -> None:
    """The library half of the flaky outage test: imports, a first predict, then the poll that
    brings the imports' changes must leave the predict's resolution (and key) cached."""
    registry, clock, source, feed, keys, cache = world
    resolver = Resolver(registry, feed=feed)  # its first poll: the feed knows the log up to here
    registry.create_tenant("initech")  # changes the feed has not polled yet...
    _, secret = keys.create("initech")
    add_version(registry, "initech", "clf", 1)
    registry.set_alias("initech", "clf", "prod", 1)
    # ...then the first request, read after them
    assert cache.authenticate(secret) == "initech" and resolver.resolve("initech", "clf", None).version == 1
    clock.now += POLL + 0.01
    feed.catch_up()  # the poll delivers tenant_created, version_added, alias_set: all older
    assert feed.seq is not None and resolver.cached("initech", "clf", None) is not None
    assert cache.peek(secret) == "initech"
    source.down = keys.down = True
    clock.now += POLL + 0.01
    assert resolver.resolve("initech", "clf", None).version == 1 and cache.authenticate(secret) == "initech"
    assert registry.resolves == 1 and keys.lookups == 1 and feed.offline


def test_one_poll_serves_the_key_cache_and_every_resolver(world) -> None:
    registry, clock, source, feed, keys, cache = world
    add_version(registry, "acme", "clf", 1)
    registry.set_alias("acme", "clf", "prod", 1)
    text, image = Resolver(registry, feed=feed), Resolver(registry, feed=feed)
    key_id, secret = keys.create("acme")
    assert cache.authenticate(secret) == "acme"
    assert text.resolve("acme", "clf", None).version == 1 and image.resolve("acme", "clf", None).version == 1
    add_version(registry, "acme", "clf", 2)
    registry.set_alias("acme", "clf", "prod", 2)
    keys.revoke("acme", key_id)
    clock.now += POLL + 0.01
    polls = feed.polls
    assert cache.authenticate(secret) is None  # this request's poll...
    assert text.cached("acme", "clf", None) is None and image.cached("acme", "clf", None) is None  # ...told all
    assert feed.polls == polls + 1
    assert text.resolve("acme", "clf", None).version == 2 and image.resolve("acme", "clf", None).version == 2
    assert feed.polls == polls + 1


def test_an_idle_feed_polls_now_and_then_and_a_busy_one_ahead_of_time(world) -> None:
    _, clock, source, feed, _, _ = world
    feed.catch_up()
    reads = source.seq_reads
    for _ in range(40):  # 10 s of background rounds with no request asking
        clock.now += POLL
        feed.refresh_ahead(POLL / 4)
    idle = source.seq_reads - reads
    assert 1 <= idle <= 10 / feed.idle_poll_s + 1  # not 40: nobody needed it current
    reads = source.seq_reads
    feed.current()  # a request asks...
    for _ in range(40):  # ...and keeps asking for 10 s: kept current ahead of them
        clock.now += POLL
        feed.refresh_ahead(POLL / 4)
        assert feed.current()
    assert source.seq_reads - reads == 40


def test_the_feed_counts_reach_the_metrics(world) -> None:
    from prometheus_client import REGISTRY

    from service.metrics import get_metrics

    _, clock, source, feed, keys, cache = world
    metrics = get_metrics()

    def counted(name: str) -> float:
        return REGISTRY.get_sample_value(f"tailor_change_log_{name}_total") or 0.0

    before = {n: counted(n) for n in ("polls", "poll_failures", "poll_waits")}
    _, secret = keys.create("acme")
    cache.authenticate(secret)  # the first poll
    source.down = True
    clock.now += POLL + 0.01
    poll = background_poll(feed, source)
    cache.authenticate(secret)  # waits for the failing poll
    poll.join(10)
    metrics.sync_changes(feed.polls, feed.poll_failures, feed.waits)
    metrics.sync_changes(feed.polls, feed.poll_failures, feed.waits)  # idempotent: counts once
    assert counted("polls") - before["polls"] == feed.polls == 2
    assert counted("poll_failures") - before["poll_failures"] == feed.poll_failures == 1
    assert counted("poll_waits") - before["poll_waits"] == feed.waits == 1
