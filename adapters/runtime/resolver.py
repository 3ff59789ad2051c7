"""Adapter references resolved to versions, cached, and kept fresh from the registry.

``Resolver.resolve(tenant, name, selector)`` answers from memory when it can. Freshness
comes from the registry's append-only change log: at most every ``poll_seconds`` a resolve
reads the log's newest sequence number (one cheap query) and, if it moved, drops the cached
entries of every tenant/adapter the new changes name. So a promotion, rollback or deletion
made by any process is seen by every process within ``poll_seconds`` (plus one query), on
SQLite and PostgreSQL alike (the registry makes change seqs visible in order).
``invalidate`` makes this process see its own writes at once. Unknown adapters are never
cached: each miss asks the registry again.

When the registry cannot be reached, cached resolutions keep being served (requests for
resident adapters go on working) and the failure is logged once, not per poll; polling is
retried with backoff, and the first successful poll replays every change missed meanwhile.
A miss then raises the registry's ``DatabaseUnavailableError`` (a 503). Only one thread polls
at a time; the others serve from the cache meanwhile instead of queueing behind a slow poll.

``refresh_ahead(margin)`` polls when the next poll is due within ``margin`` seconds.
``Freshener`` is a daemon thread that calls such refreshers (resolvers, the key cache, the
rate limiter's quotas) a little before they fall due, so requests find memory fresh and almost
never poll themselves: a poll on the request path costs a thread hop and a query, and polls
driven only by requests lag when requests do (a promotion would wait for the next request
that happens to poll). The guarantee does not depend on the thread: memory older than
``poll_seconds`` is never answered from (``cached`` returns None, ``resolve`` polls first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from adapters.registry import Registry, VersionRecord

Key = tuple[str, str, "int | str | None"]
log = logging.getLogger("tailor.resolver")
MAX_POLL_BACKOFF_S = 2.0  # also the most a recovered registry waits to be noticed
CHANGES_PAGE = 1000


class Resolver:
    def __init__(self, registry: Registry, *, poll_seconds: float = 0.25, max_entries: int = 100_000) -> None:
        self.registry = registry
        self.poll_seconds = poll_seconds
        self.max_entries = max_entries
        self._cache: dict[Key, VersionRecord] = {}
        self._lock = threading.Lock()  # guards _cache and _generation
        self._poll_lock = threading.Lock()  # one poller at a time
        self._generation = 0  # bumped whenever entries are dropped
        self._failures = 0
        self.hits = self.misses = self.invalidations = self.poll_failures = 0
        self._next_poll = time.monotonic() + poll_seconds
        # None: not known yet (the registry was unreachable); the first good poll sets it.
        self._seq: int | None = None
        try:
            self._seq = registry.change_seq()
        except Exception as e:  # noqa: BLE001 - built during an outage: start empty and catch up
            self._failed(e)

    @property
    def offline(self) -> bool:
        """True while the last poll of the registry failed."""
        return self._failures > 0

    def cached(self, tenant: str, adapter: str, selector: int | str | None) -> VersionRecord | None:
        """The cached resolution while no poll is due, else None; never touches the registry.

        A caller that gets None calls ``resolve`` (which may query); one that gets a record
        sees exactly what ``resolve`` would have answered from memory.
        """
        if time.monotonic() >= self._next_poll:
            return None
        record = self._cache.get((tenant, adapter, selector))
        if record is not None:
            self.hits += 1
        return record

    def resolve(self, tenant: str, adapter: str, selector: int | str | None) -> VersionRecord:
        self._refresh()
        key = (tenant, adapter, selector)
        record = self._cache.get(key)
        if record is not None:
            self.hits += 1
            return record
        self.misses += 1
        generation = self._generation
        record = self.registry.resolve(tenant, adapter, selector)  # raises when unknown: not cached
        with self._lock:
            # A poll that dropped entries while we read may have dropped this very key: the
            # record could predate that change, so answer with it but do not keep it.
            if generation == self._generation:
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()  # rare; a cold cache only costs queries
                self._cache[key] = record
        return record

    def invalidate(self, tenant: str, adapter: str | None = None) -> None:
        with self._lock:
            doomed = [k for k in self._cache if k[0] == tenant and (adapter is None or k[1] == adapter)]
            for k in doomed:
                del self._cache[k]
            self._generation += 1
            self.invalidations += len(doomed)

    def refresh_ahead(self, margin: float) -> None:
        """Poll now if the next poll is due within ``margin`` seconds (``Freshener``)."""
        self._refresh(margin)

    def _refresh(self, margin: float = 0.0) -> None:
        if time.monotonic() < self._next_poll - margin or not self._poll_lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() < self._next_poll - margin:
                return
            self._poll()
        finally:
            self._poll_lock.release()

    def _poll(self) -> None:
        try:
            seq = self.registry.change_seq()
            known = self._seq
            changes = (self.registry.changes_since(known, limit=CHANGES_PAGE)
                       if known is not None and seq != known else [])
        except Exception as e:  # noqa: BLE001 - DatabaseUnavailableError mostly; a poll must never fail requests
            self._failed(e)
            return
        if self._failures:
            log.warning("registry reachable again after %d failed poll(s); catching up on changes",
                        self._failures)
            self._failures = 0
        self._next_poll = time.monotonic() + self.poll_seconds
        if seq == self._seq:
            return
        with self._lock:
            if known is None or (len(changes) == CHANGES_PAGE and changes[-1].seq < seq):
                self._cache.clear()  # no starting point, or too far behind to replay: start over
            touched = {(c.tenant, c.adapter) for c in changes}
            for k in [k for k in self._cache if (k[0], k[1]) in touched or (k[0], None) in touched]:
                del self._cache[k]
            self._generation += 1
            self._seq = seq

    def _failed(self, e: Exception) -> None:
        self._failures += 1
        self.poll_failures += 1
        if self._failures == 1:
            log.warning("cannot poll the registry for changes (%s); serving cached resolutions "
                        "until it is back", e)
        backoff = min(MAX_POLL_BACKOFF_S, self.poll_seconds * 2 ** min(self._failures, 8))
        self._next_poll = time.monotonic() + backoff


class Freshener:
    """A daemon thread that calls each of ``refreshers`` every ``interval`` seconds (each one
    cheap unless something is due: ``Resolver.refresh_ahead``, ``KeyCache.refresh_ahead``, a
    rate limiter's stale quotas). A refresher that raises is logged and called again next time.
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
