"""Adapter references resolved to versions, cached, and kept fresh from the registry.

``Resolver.resolve(tenant, name, selector)`` answers from memory when it can. Freshness comes
from the registry's append-only change log, read by a ``ChangeFeed`` (``adapters.change_feed``;
a serving process shares one between its resolvers and its key cache): each entry is tagged
with the log's seq read just before the entry was read from the registry, and a change newer
than the tag that names the entry's tenant/adapter drops it. So a promotion, rollback or
deletion made by any process is seen by every process within ``poll_seconds`` (plus one
poll), on SQLite and PostgreSQL alike (the registry makes change seqs visible in order).
``invalidate`` makes this process see its own writes at once. Unknown adapters are never
cached: each miss asks the registry again.

Memory is answered from only while the feed is current (``cached`` returns None otherwise;
``resolve`` first catches the feed up: it polls, or waits for the poll already in flight
rather than go around it). When the registry cannot be reached, the feed is offline and
cached resolutions keep being served (requests for resident adapters go on working); the
failure is logged once, polling is retried with backoff, and the first successful poll
replays every change missed meanwhile. A miss then raises the registry's
``DatabaseUnavailableError`` (a 503).

``refresh_ahead(margin)`` polls the feed when it falls due within ``margin`` seconds.
``Freshener`` is a daemon thread that calls such refreshers (the process's change feed, the
rate limiter's quotas) a little before they fall due, so requests find memory fresh and
almost never poll themselves: a poll on the request path costs a thread hop and a query, and
polls driven only by requests lag when requests do. The guarantee does not depend on the
thread: memory is never answered from while the feed is not current.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from adapters.change_feed import ChangeFeed
from adapters.registry import Change, Registry, VersionRecord

Key = tuple[str, str, "int | str | None"]
log = logging.getLogger("tailor.resolver")


class Resolver:
    def __init__(self, registry: Registry, *, poll_seconds: float = 0.25, max_entries: int = 100_000,
                 feed: ChangeFeed | None = None) -> None:
        """``feed``: the process's shared change feed; without one the resolver reads the log
        through a feed of its own (polling every ``poll_seconds``)."""
        self.registry = registry
        self.feed = feed if feed is not None else ChangeFeed(registry, poll_seconds=poll_seconds)
        self.poll_seconds = self.feed.poll_seconds
        self.max_entries = max_entries
        self._cache: dict[Key, tuple[VersionRecord, int]] = {}  # key -> (record, seq read before it)
        self._lock = threading.Lock()  # guards _cache, _generation and _applied
        self._generation = 0  # bumped by invalidate
        self._applied = 0  # the newest change seq the feed has told us of
        self.hits = self.misses = self.invalidations = 0
        self.feed.subscribe(self)
        if not self.feed.current():
            self.feed.catch_up()  # built during an outage: offline at once, catching up later

    @property
    def offline(self) -> bool:
        """True while the last poll of the registry failed."""
        return self.feed.offline

    @property
    def poll_failures(self) -> int:
        return self.feed.poll_failures

    def cached(self, tenant: str, adapter: str, selector: int | str | None) -> VersionRecord | None:
        """The cached resolution while the feed is current, else None; never touches the registry.

        A caller that gets None calls ``resolve`` (which may query); one that gets a record
        sees exactly what ``resolve`` would have answered from memory.
        """
        if not self.feed.current():
            return None
        entry = self._cache.get((tenant, adapter, selector))
        if entry is None:
            return None
        self.hits += 1
        return entry[0]

    def resolve(self, tenant: str, adapter: str, selector: int | str | None) -> VersionRecord:
        if not self.feed.current():
            self.feed.catch_up()
        key = (tenant, adapter, selector)
        entry = self._cache.get(key)
        if entry is not None:
            self.hits += 1
            return entry[0]
        self.misses += 1
        generation = self._generation
        seq = self.feed.read_seq()  # every change up to seq is in what we read next
        record = self.registry.resolve(tenant, adapter, selector)  # raises when unknown: not cached
        with self._lock:
            # A change newer than seq told meanwhile, or a local invalidation, may concern this
            # very key: the record could predate it, so answer with it but do not keep it.
            if generation == self._generation and self._applied <= seq:
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()  # rare; a cold cache only costs queries
                self._cache[key] = (record, seq)
        return record

    def invalidate(self, tenant: str, adapter: str | None = None) -> None:
        with self._lock:
            doomed = [k for k in self._cache if k[0] == tenant and (adapter is None or k[1] == adapter)]
            for k in doomed:
                del self._cache[k]
            self._generation += 1
            self.invalidations += len(doomed)

    def refresh_ahead(self, margin: float) -> None:
        """Poll the feed now if it falls due within ``margin`` seconds (``Freshener``)."""
        self.feed.refresh_ahead(margin)

    # -- the feed's calls (adapters.change_feed.Subscriber) ------------------------------------

    def changes(self, batch: Sequence[Change]) -> None:
        newest: dict[tuple[str, str | None], int] = {}
        for c in batch:
            newest[(c.tenant, c.adapter)] = c.seq
        with self._lock:
            for k in [k for k, (_, tag) in self._cache.items()
                      if max(newest.get((k[0], k[1]), 0), newest.get((k[0], None), 0)) > tag]:
                del self._cache[k]
            self._applied = max(self._applied, batch[-1].seq)

    def reset(self, seq: int) -> None:
        with self._lock:
            for k in [k for k, (_, tag) in self._cache.items() if tag < seq]:
                del self._cache[k]
            self._applied = max(self._applied, seq)


class Freshener:
    """A daemon thread that calls each of ``refreshers`` every ``interval`` seconds (each one
    cheap unless something is due: ``ChangeFeed.refresh_ahead`` of the process's one change feed,
    a rate limiter's stale quotas). A refresher that raises is logged and called again next time.
    ``run_once()`` does one round in the caller's thread (tests); ``close()`` stops the thread.
    """

    def __init__(self, refreshers: Sequence[Callable[[], None]], interval: float, *,
                 name: str = "tailor-freshener", start: bool = True) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.refreshers, self.interval = list(refreshers), interval
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if start:
            self._thread.start()

    def run_once(self) -> None:
        for refresh in self.refreshers:
            try:
                refresh()
            except Exception:  # noqa: BLE001 - freshness is retried next round; requests still poll
                log.exception("background refresh failed")
        self.rounds += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
