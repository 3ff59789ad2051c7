"""One reader of the registry's change log per process, shared by every cache that needs it.

A serving process remembers what the registry said (verified API keys: ``adapters.key_cache``;
resolved adapter versions: ``adapters.runtime.resolver``) and learns of the changes any
process makes from the registry's append-only change log. ``ChangeFeed`` reads that log for
all of them: one poll (one indexed query while nothing changed) serves every subscriber,
instead of one poller per cache. Contract:

* ``subscribe(s)``: ``s.changes(batch)`` gets each batch of new changes, in seq order;
  ``s.reset(seq)`` says the feed cannot replay what came before ``seq`` (its first poll, or
  more than ``CHANGES_PAGE`` behind): drop whatever was read before ``seq``. Both are called
  inside the poll, before the feed counts as current, so whoever then sees ``current()``
  sees their effects. A subscriber that raises is logged; the others are still told.
* ``current()`` never blocks and does no I/O: True while memory may be answered from, i.e.
  the last good poll started less than ``poll_seconds`` ago, or the last poll failed and its
  retry is not due yet (an outage: memory keeps serving; each cache bounds for how long, the
  key cache by its ``ttl_s``). Each call counts as demand (see ``refresh_ahead``).
* ``catch_up()`` may block and never raises: it polls in the caller's thread; or, when another
  thread's poll is in flight, it waits for that poll (at most ``wait_s``) instead of going
  around it, so a caller never queries the database for what memory is about to answer. A
  failed poll is an outage (``offline``), retried with backoff up to ``MAX_POLL_BACKOFF_S``;
  the first poll that succeeds again replays every change missed meanwhile.
* ``refresh_ahead(margin)``: the background thread's call (``adapters.runtime.resolver.
  Freshener``): polls when the feed stops being current within ``margin`` s, so requests find
  it current and never poll themselves. While nothing asked for ``idle_after_s`` (an idle
  worker) it polls only every ``idle_poll_s`` instead of ~4 times a second; the first request
  after a pause then polls once on its own path. Freshness never depends on this thread.
* ``read_seq()``: the log's newest seq now (one query). A cache reads it just before it reads
  an entry from the database and tags the entry with it: only changes newer than the tag can
  make the entry stale, so a poll that delivers older changes (say the imports that preceded
  the first predict) does not throw away an entry read after them.

The bound: an answer from memory reflects every change committed ``poll_seconds`` (0.25 s)
before it was given, plus the length of the poll in flight (at most ``wait_s`` waited); during
an outage of the registry, memory is all there is.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from adapters.registry.records import Change

log = logging.getLogger("tailor.changes")
CHANGES_PAGE = 1000
MAX_POLL_BACKOFF_S = 2.0  # also the most a recovered registry waits to be noticed


class ChangeSource(Protocol):
    """What the feed reads (``adapters.registry.Registry`` is one)."""

    def change_seq(self) -> int: ...

    def changes_since(self, seq: int, limit: int = ...) -> list[Change]: ...


class Subscriber(Protocol):
    def changes(self, batch: Sequence[Change]) -> None: ...

    def reset(self, seq: int) -> None: ...


class ChangeFeed:
    def __init__(self, source: ChangeSource, *, poll_seconds: float = 0.25, wait_s: float = 0.5,
                 idle_after_s: float = 2.0, idle_poll_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_wait: Callable[[], None] | None = None) -> None:
        if poll_seconds <= 0 or wait_s < 0:
            raise ValueError("poll_seconds must be positive and wait_s not negative")
        self.source, self._clock, self.on_wait = source, clock, on_wait
        self.poll_seconds, self.wait_s = poll_seconds, wait_s
        self.idle_after_s, self.idle_poll_s = idle_after_s, idle_poll_s
        self._subscribers: list[Subscriber] = []
        self._poll_lock = threading.Lock()  # one poll at a time; waiters wait on it
        self._seq: int | None = None  # the last seq delivered; None: no starting point yet
        self._valid_until = -math.inf  # memory may be answered from until then
        self._asked = -math.inf  # the last time anyone asked whether memory is current
        self._polled_at = -math.inf
        self._failures = 0
        self.polls = self.poll_failures = self.waits = 0

    @property
    def offline(self) -> bool:
        """True while the last poll of the registry failed."""
        return self._failures > 0

    @property
    def seq(self) -> int | None:
        """The newest change seq delivered to subscribers (None before the first good poll)."""
        return self._seq

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._poll_lock:
            self._subscribers.append(subscriber)

    def current(self) -> bool:
        now = self._clock()
        self._asked = now
        return now < self._valid_until

    def catch_up(self) -> None:
        if self._poll_lock.acquire(blocking=False):
            try:
                if self._clock() >= self._valid_until:  # not polled while we got here
                    self._poll()
            finally:
                self._poll_lock.release()
            return
        self.waits += 1  # a poll is in flight: its answer is what we want
        if self.on_wait is not None:
            self.on_wait()
        if self._poll_lock.acquire(timeout=self.wait_s):
            self._poll_lock.release()

    def refresh_ahead(self, margin: float) -> None:
        now = self._clock()
        if now < self._valid_until - margin:
            return
        if now - self._asked > self.idle_after_s and now - self._polled_at < self.idle_poll_s:
            return  # idle: nobody needs memory current now; poll now and then only
        if not self._poll_lock.acquire(blocking=False):
            return
        try:
            if self._clock() >= self._valid_until - margin:
                self._poll()
        finally:
            self._poll_lock.release()

    def read_seq(self) -> int:
        return self.source.change_seq()

    def _poll(self) -> None:  # under _poll_lock
        started = self._polled_at = self._clock()
        self.polls += 1
        known = self._seq
        try:
            seq = self.source.change_seq()
            batch = self.source.changes_since(known, limit=CHANGES_PAGE) if known is not None and seq != known else []
        except Exception as e:  # noqa: BLE001 - DatabaseUnavailableError mostly; a poll never fails a request
            self._failed(e)
            return
        if self._failures:
            log.warning("registry reachable again after %d failed poll(s); catching up on changes", self._failures)
            self._failures = 0
        if known is None or (len(batch) == CHANGES_PAGE and batch[-1].seq < seq):
            self._tell(lambda s: s.reset(seq))  # no starting point, or too far behind to replay
        elif batch:
            self._tell(lambda s: s.changes(batch))
        self._seq = seq
        self._valid_until = started + self.poll_seconds

    def _tell(self, call: Callable[[Subscriber], None]) -> None:
        for subscriber in self._subscribers:
            try:
                call(subscriber)
            except Exception:  # noqa: BLE001 - one broken cache must not keep the others stale
                log.exception("a change-log subscriber failed")

    def _failed(self, e: Exception) -> None:
        self._failures += 1
        self.poll_failures += 1
        if self._failures == 1:
            log.warning("cannot poll the registry for changes (%s); serving from memory until it is back", e)
        backoff = min(MAX_POLL_BACKOFF_S, self.poll_seconds * 2 ** min(self._failures, 8))
        self._valid_until = self._clock() + backoff
