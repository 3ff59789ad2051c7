"""Adapter references resolved to versions, cached, and kept fresh from the registry.

``Resolver.resolve(tenant, name, selector)`` answers from memory when it can. Freshness
comes from the registry's append-only change log: at most every ``poll_seconds`` a resolve
reads the log's newest sequence number (one cheap query) and, if it moved, drops the cached
entries of every tenant/adapter the new changes name. So a promotion, rollback or deletion
made by any process is seen by every process within ``poll_seconds`` (plus one query).
``invalidate`` makes this process see its own writes at once. Unknown adapters are never
cached: each miss asks the registry again.
"""

from __future__ import annotations

import threading
import time

from adapters.registry import Registry, VersionRecord

Key = tuple[str, str, "int | str | None"]


class Resolver:
    def __init__(self, registry: Registry, *, poll_seconds: float = 0.25, max_entries: int = 100_000) -> None:
        self.registry = registry
        self.poll_seconds = poll_seconds
        self.max_entries = max_entries
        self._cache: dict[Key, VersionRecord] = {}
        self._lock = threading.Lock()
        self._seq = registry.change_seq()
        self._checked = time.monotonic()
        self.hits = self.misses = self.invalidations = 0

    def resolve(self, tenant: str, adapter: str, selector: int | str | None) -> VersionRecord:
        self._refresh()
        key = (tenant, adapter, selector)
        record = self._cache.get(key)
        if record is not None:
            self.hits += 1
            return record
        self.misses += 1
        record = self.registry.resolve(tenant, adapter, selector)  # raises when unknown: not cached
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()  # rare; a cold cache only costs queries
            self._cache[key] = record
        return record

    def invalidate(self, tenant: str, adapter: str | None = None) -> None:
        with self._lock:
            doomed = [k for k in self._cache if k[0] == tenant and (adapter is None or k[1] == adapter)]
            for k in doomed:
                del self._cache[k]
            self.invalidations += len(doomed)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.poll_seconds:
            return
        with self._lock:
            if now - self._checked < self.poll_seconds:
                return
            self._checked = now
            seq = self.registry.change_seq()
            if seq == self._seq:
                return
            changes = self.registry.changes_since(self._seq, limit=1000)
            if len(changes) == 1000 and changes[-1].seq < seq:
                self._cache.clear()  # too far behind to replay: start over
            touched = {(c.tenant, c.adapter) for c in changes}
            for k in [k for k in self._cache if (k[0], k[1]) in touched or (k[0], None) in touched]:
                del self._cache[k]
            self._seq = seq
