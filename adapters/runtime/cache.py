"""The resident set: decoded adapters kept in host memory, least recently used evicted.

``ResidentCache`` maps an immutable ``VersionKey`` to its ``LoadedAdapter``. It is bounded
both by count and by bytes; inserting past either bound evicts the least recently used
entries (never the one being inserted). A miss calls the caller's loader outside the cache lock, and
concurrent misses of the same key share one load (single flight); a failed load caches
nothing and raises to every waiter. Entries are immutable, so a caller holding one may keep
using it after it is evicted. Counters: hits, misses, evictions, loads, load errors and the
latency of recent loads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.runtime.loaded import LoadedAdapter, VersionKey


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_errors: int = 0
    resident: int = 0
    resident_bytes: int = 0
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: LoadedAdapter | None = None
        self.error: BaseException | None = None


class ResidentCache:
    def __init__(
        self, *, max_count: int, max_bytes: int, on_load: Callable[[float], None] | None = None,
    ) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("resident cache bounds must be positive")
        self.max_count, self.max_bytes = max_count, max_bytes
        self._on_load = on_load
        self._entries: OrderedDict[VersionKey, LoadedAdapter] = OrderedDict()
        self._bytes = 0
        self._flights: dict[VersionKey, _Flight] = {}
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __contains__(self, key: VersionKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def peek(self, key: VersionKey) -> LoadedAdapter | None:
        """The resident copy of ``key`` (a hit, made most recent) or None; never loads or waits."""
        with self._lock:
            return self._hit(key)

    def get(self, key: VersionKey, load: Callable[[], LoadedAdapter]) -> LoadedAdapter:
        """The resident copy of ``key``; on a miss ``load()`` builds it (once, however many ask)."""
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            self.stats.misses += 1
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.value is not None
            return flight.value
        t0 = time.perf_counter()
        try:
            value = load()
        except BaseException as e:
            with self._lock:
                self.stats.load_errors += 1
                del self._flights[key]
            flight.error = e
            flight.done.set()
            raise
        elapsed = time.perf_counter() - t0
        with self._lock:
            self._insert(key, value)
            self.stats.loads += 1
            self.stats.load_seconds.append(elapsed)
            del self._flights[key]
        flight.value = value
        flight.done.set()
        if self._on_load is not None:
            self._on_load(elapsed)
        return value

    def _hit(self, key: VersionKey) -> LoadedAdapter | None:
        """Under the lock: the entry, made most recent and counted as a hit, or None."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
        return hit

    def discard(self, predicate: Callable[[VersionKey], bool]) -> int:
        """Drop every entry whose key matches (e.g. a deleted adapter); returns how many."""
        with self._lock:
            doomed = [k for k in self._entries if predicate(k)]
            for k in doomed:
                self._bytes -= self._entries.pop(k).nbytes
            self._sync_stats()
            return len(doomed)

    def _insert(self, key: VersionKey, value: LoadedAdapter) -> None:
        if key in self._entries:
            return
        self._entries[key] = value
        self._bytes += value.nbytes
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_count or self._bytes > self.max_bytes
        ):
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.stats.evictions += 1
        self._sync_stats()

    def _sync_stats(self) -> None:
        self.stats.resident = len(self._entries)
        self.stats.resident_bytes = self._bytes
