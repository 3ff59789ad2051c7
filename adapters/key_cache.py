"""Verified API keys remembered per process, kept honest by the registry's change log.

Checking a key against the database on every request costs a query and, in an async server,
a thread hop: most of a small request's overhead. ``KeyCache`` remembers, by the key's
sha256, which tenant a key belongs to (or that it belongs to none) and answers from memory.
Contract:

* ``peek(secret)`` never blocks: the tenant, ``None`` for a key known to be bad, or
  ``UNKNOWN`` when memory cannot answer (never seen, older than ``ttl_s``, or the change log
  is due to be polled). ``authenticate(secret)`` always answers: it polls the change log when
  due, then asks memory, then the ``KeyStore`` (which remembers what it verified).
* Revocation: ``KeyStore.revoke`` and tenant deletion append to the registry's change log.
  Every process drops the cached keys of each tenant a new change names, so a key revoked
  anywhere stops working here within ``poll_seconds`` (0.25 s); in the process that revoked it
  (``forget_tenant``) at once. ``ttl_s`` bounds how long any answer is reused regardless.
* Unknown keys are remembered as bad too (secrets are 240-bit random, so a bad key never
  turns good later): a flood of bad keys costs no queries. Memory is bounded
  (``max_entries``; cleared when full, which only costs queries).
* When the change log cannot be read, cached answers keep serving (like the resolver) until
  ``ttl_s``; the KeyStore's own outage grace then applies.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Final

from adapters.keys import MAX_SECRET_CHARS, SECRET_PREFIX, KeyStore
from adapters.registry import Registry
from adapters.runtime.resolver import CHANGES_PAGE

UNKNOWN: Final = object()  # peek: memory cannot answer; call authenticate


class KeyCache:
    def __init__(self, keys: KeyStore, registry: Registry, *, poll_seconds: float = 0.25,
                 ttl_s: float = 60.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keys, self.registry, self._clock = keys, registry, clock
        self.poll_seconds, self.ttl_s, self.max_entries = poll_seconds, ttl_s, max_entries
        self._known: dict[str, tuple[str | None, float]] = {}  # sha256 -> (tenant or None, verified at)
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._generation = 0
        self._next_poll = 0.0  # poll before the first answer
        self._seq: int | None = None
        self.hits = self.misses = 0

    def peek(self, secret: str) -> str | None | object:
        if not _plausible(secret):
            return None
        now = self._clock()
        if now >= self._next_poll:
            return UNKNOWN
        entry = self._known.get(_digest(secret))
        if entry is None or now - entry[1] > self.ttl_s:
            return UNKNOWN
        self.hits += 1
        return entry[0]

    def authenticate(self, secret: str) -> str | None:
        """The tenant a live key belongs to, or None (blocking: may query the database)."""
        if not _plausible(secret):
            return None
        self._refresh()
        known = self.peek(secret)
        if known is not UNKNOWN:
            return known  # type: ignore[return-value]
        self.misses += 1
        generation = self._generation
        tenant = self.keys.authenticate(secret)
        with self._lock:
            # a change seen while we asked may concern this very key: answer, do not keep
            if generation == self._generation:
                if len(self._known) >= self.max_entries:
                    self._known.clear()
                self._known[_digest(secret)] = (tenant, self._clock())
        return tenant

    def forget_tenant(self, tenant: str) -> None:
        """This process revoked a key of ``tenant`` or deleted it: forget its keys now."""
        with self._lock:
            for digest in [d for d, (t, _) in self._known.items() if t == tenant]:
                del self._known[digest]
            self._generation += 1

    def refresh_ahead(self, margin: float) -> None:
        """Poll now if the next poll is due within ``margin`` seconds (a background thread's
        call, ``adapters.runtime.resolver.Freshener``, so ``peek`` rarely finds a poll due)."""
        self._refresh(margin)

    def _refresh(self, margin: float = 0.0) -> None:
        if self._clock() < self._next_poll - margin or not self._poll_lock.acquire(blocking=False):
            return
        try:
            if self._clock() < self._next_poll - margin:  # another thread polled while we waited
                return
            self._poll()
        finally:
            self._poll_lock.release()

    def _poll(self) -> None:
        try:
            seq = self.registry.change_seq()
            changes = (self.registry.changes_since(self._seq, limit=CHANGES_PAGE)
                       if self._seq is not None and seq != self._seq else [])
        except Exception:  # noqa: BLE001 - an outage: keep cached answers until their ttl
            self._next_poll = self._clock() + self.poll_seconds
            return
        with self._lock:
            if self._seq is None or (len(changes) == CHANGES_PAGE and changes[-1].seq < seq):
                if self._seq is not None:
                    self._known.clear()  # too far behind to replay
            else:
                touched = {c.tenant for c in changes if c.adapter is None}
                if touched:
                    for digest in [d for d, (t, _) in self._known.items() if t in touched]:
                        del self._known[digest]
            self._generation += 1
            self._seq = seq
        self._next_poll = self._clock() + self.poll_seconds


def _plausible(secret: object) -> bool:
    return isinstance(secret, str) and secret.startswith(SECRET_PREFIX) and len(secret) <= MAX_SECRET_CHARS


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
