"""Verified API keys remembered per process, kept honest by the registry's change log.

Checking a key against the database on every request costs a query and, in an async server,
a thread hop: most of a small request's overhead. ``KeyCache`` remembers, by the key's
sha256, which tenant a key belongs to (or that it belongs to none) and answers from memory.
Contract:

* ``peek(secret)`` never blocks: the tenant, ``None`` for a key known to be bad, or
  ``UNKNOWN`` when memory cannot answer (never seen, older than ``ttl_s``, or the change feed
  is not current). ``authenticate(secret)`` always answers: it catches the change feed up
  when it is not current (polling, or waiting at most the feed's ``wait_s`` for the poll
  another thread has in flight), then asks memory, then the ``KeyStore`` (which remembers what
  it verified).
* Revocation: ``KeyStore.revoke`` and tenant deletion append to the registry's change log.
  Every process drops the cached keys of each tenant a newer change names (all but
  ``tenant_created``), so a key revoked anywhere stops working here within the feed's
  ``poll_seconds`` (0.25 s) plus one poll; in the process that revoked it (``forget_tenant``)
  at once. ``ttl_s`` bounds how long any answer is reused regardless.
* Unknown keys are remembered as bad too (secrets are 240-bit random, so a bad key never
  turns good later): a flood of bad keys costs no queries. Memory is bounded
  (``max_entries``; cleared when full, which only costs queries).
* When the change log cannot be read (the feed is offline, or its poll outlasts ``wait_s``),
  cached answers keep serving until ``ttl_s``, never a database query for a key memory knows;
  a key memory does not know goes to the ``KeyStore``, whose own outage grace then applies.
* Each entry is tagged with the change log's seq read just before the key was checked: only a
  change newer than that drops it (so a tenant's creation, logged before its key was first
  used, does not make a freshly verified key cost a second query).

The process's change feed (``adapters.change_feed.ChangeFeed``) is shared with its resolvers;
a cache built without one reads the log through a feed of its own.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from adapters.change_feed import ChangeFeed
from adapters.keys import MAX_SECRET_CHARS, SECRET_PREFIX, KeyStore
from adapters.registry import Change, Registry

UNKNOWN: Final = object()  # peek: memory cannot answer; call authenticate
HARMLESS_CHANGES: Final = frozenset({"tenant_created"})  # tenant-wide changes that leave keys valid


@dataclass(frozen=True, slots=True)
class _Verified:
    tenant: str | None
    at: float  # the cache's clock when it was checked
    seq: int  # the change log's seq read just before it was checked


class KeyCache:
    def __init__(self, keys: KeyStore, registry: Registry, *, poll_seconds: float = 0.25,
                 ttl_s: float = 60.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, feed: ChangeFeed | None = None) -> None:
        """``feed``: the process's shared change feed; without one, a feed of this cache's own
        over ``registry`` polling every ``poll_seconds`` on ``clock``."""
        self.keys, self.registry, self._clock = keys, registry, clock
        self.feed = feed if feed is not None else ChangeFeed(registry, poll_seconds=poll_seconds, clock=clock)
        self.poll_seconds, self.ttl_s, self.max_entries = self.feed.poll_seconds, ttl_s, max_entries
        self._known: dict[str, _Verified] = {}  # sha256 -> what it was verified as
        self._lock = threading.Lock()
        self._generation = 0  # bumped by forget_tenant
        self._applied = 0  # the newest change seq the feed has told us of
        self.hits = self.misses = 0
        self.feed.subscribe(self)

    def peek(self, secret: str) -> str | None | object:
        if not _plausible(secret):
            return None
        if not self.feed.current():
            return UNKNOWN
        return self._remembered(secret)

    def authenticate(self, secret: str) -> str | None:
        """The tenant a live key belongs to, or None (blocking: may query the database)."""
        if not _plausible(secret):
            return None
        if not self.feed.current():
            self.feed.catch_up()  # after it, memory is as fresh as the registry lets it be
        known = self._remembered(secret)
        if known is not UNKNOWN:
            return known  # type: ignore[return-value]
        self.misses += 1
        generation = self._generation
        try:
            seq: int | None = self.feed.read_seq()
        except Exception:  # noqa: BLE001 - an outage: the KeyStore may still answer; keep nothing
            seq = None
        tenant = self.keys.authenticate(secret)
        with self._lock:
            # a change told meanwhile may concern this very key: answer, do not keep
            if seq is not None and generation == self._generation and self._applied <= seq:
                if len(self._known) >= self.max_entries:
                    self._known.clear()
                self._known[_digest(secret)] = _Verified(tenant, self._clock(), seq)
        return tenant

    def forget_tenant(self, tenant: str) -> None:
        """This process revoked a key of ``tenant`` or deleted it: forget its keys now."""
        with self._lock:
            for digest in [d for d, v in self._known.items() if v.tenant == tenant]:
                del self._known[digest]
            self._generation += 1

    def refresh_ahead(self, margin: float) -> None:
        """Poll the feed now if it falls due within ``margin`` seconds (a background thread's
        call, ``adapters.runtime.resolver.Freshener``, so ``peek`` rarely finds it stale)."""
        self.feed.refresh_ahead(margin)

    # -- the feed's calls (adapters.change_feed.Subscriber) ------------------------------------

    def changes(self, batch: Sequence[Change]) -> None:
        newest = {c.tenant: c.seq for c in batch if c.adapter is None and c.kind not in HARMLESS_CHANGES}
        with self._lock:
            if newest:
                for digest in [d for d, v in self._known.items() if newest.get(v.tenant, 0) > v.seq]:  # type: ignore[arg-type]
                    del self._known[digest]
            self._applied = max(self._applied, batch[-1].seq)

    def reset(self, seq: int) -> None:
        with self._lock:
            for digest in [d for d, v in self._known.items() if v.seq < seq]:
                del self._known[digest]
            self._applied = max(self._applied, seq)

    def _remembered(self, secret: str) -> str | None | object:
        entry = self._known.get(_digest(secret))
        if entry is None or self._clock() - entry.at > self.ttl_s:
            return UNKNOWN
        self.hits += 1
        return entry.tenant


def _plausible(secret: object) -> bool:
    return isinstance(secret, str) and secret.startswith(SECRET_PREFIX) and len(secret) <= MAX_SECRET_CHARS


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
