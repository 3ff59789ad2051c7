"""Micro-batching: concurrent requests of many tenants share one forward pass.

``MicroBatcher.submit(rows)`` queues a request's ``(adapter, text)`` rows and returns a
``concurrent.futures.Future`` of its predictions, in order. One background thread takes rows
from the queue, oldest first, until it holds ``max_batch_size`` rows or ``max_wait_ms`` have
passed since the oldest queued row arrived, and runs **one** ``engine.classify`` over the
merged rows (different tenants, adapters and label sets mix freely: the engine routes every
row to its own adapter). Each caller's future gets exactly its own slice.

* With ``announced_arrivals=True`` the wait is cut short when nobody is on the way: callers
  wrap the work before their ``submit`` (parsing, authentication, adapter lookup) in
  ``with batcher.incoming():``, and the batcher waits for more rows only while such an
  announced request is pending. A lone request at low load then runs at once instead of
  sitting out ``max_wait_ms``; under load, batches fill as before.
* A request larger than ``max_batch_size`` is split across consecutive batches; its result
  is reassembled in order and resolved when its last row is done.
* An exception in a batch fails only the requests that had rows in that batch.
* A caller that cancels its future (e.g. a client that went away) has its remaining rows
  skipped.
* ``close()`` stops the thread; requests still queued fail with ``RuntimeError``.
* Counters: ``batches``, ``rows``, ``errors``, ``recent`` (the last batches' sizes and distinct
  adapter counts) and an ``on_batch(size, n_adapters, seconds)`` callback for metrics.

``predict(rows)`` is the asyncio face: it awaits the same future without blocking the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from adapters.runtime.engine import Engine, Prediction
from adapters.runtime.loaded import LoadedAdapter

log = logging.getLogger("tailor.batcher")

Row = tuple[LoadedAdapter, str]
OnBatch = Callable[[int, int, float], None]


@dataclass(frozen=True)
class BatchRecord:
    size: int
    adapters: int  # distinct adapter versions in the batch
    requests: int  # distinct requests with rows in the batch
    seconds: float


class _Request:
    __slots__ = ("rows", "future", "results", "remaining", "arrived")

    def __init__(self, rows: list[Row], arrived: float) -> None:
        self.rows = rows
        self.future: Future[list[Prediction]] = Future()
        self.results: list[Prediction | None] = [None] * len(rows)
        self.remaining = len(rows)
        self.arrived = arrived


class MicroBatcher:
    def __init__(
        self, engine: Engine, max_batch_size: int = 32, max_wait_ms: float = 5.0, *,
        on_batch: OnBatch | None = None, history: int = 1024, name: str = "tailor-batcher",
        announced_arrivals: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_batch_size > engine.config.max_batch_size:
            raise ValueError(
                f"max_batch_size {max_batch_size} exceeds the engine's max_batch_size "
                f"{engine.config.max_batch_size}"
            )
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.announced_arrivals = announced_arrivals
        self._incoming = 0  # announced requests that have not submitted yet
        self._queue: deque[list[Any]] = deque()  # [request, next row index], oldest first
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.rows = 0
        self.errors = 0
        self.recent: deque[BatchRecord] = deque(maxlen=history)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- callers ----------------------------------------------------------------------------

    def submit(self, rows: list[Row]) -> Future[list[Prediction]]:
        """Queue ``rows``; the future resolves to one Prediction per row, in order."""
        rows = list(rows)
        for i, row in enumerate(rows):
            if not (isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], LoadedAdapter)
                    and isinstance(row[1], str)):
                raise TypeError(f"row {i} must be a (LoadedAdapter, str) tuple")
        req = _Request(rows, time.monotonic())
        if not rows:
            req.future.set_result([])
            return req.future
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append([req, 0])
            self._queued_rows += len(rows)
            self._cond.notify()
        return req.future

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that will ``submit`` before this block ends (or never, if it fails)."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify()

    async def predict(self, rows: list[Row]) -> list[Prediction]:
        return await asyncio.wrap_future(self.submit(rows))

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            pending = [seg[0] for seg in self._queue]
            self._queue.clear()
            self._queued_rows = 0
        for req in pending:
            _fail(req, RuntimeError("the batcher was closed before this request ran"))

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the batching thread ------------------------------------------------------------------

    def _take(self) -> list[tuple[_Request, int, int]] | None:
        """Wait for rows, then take up to max_batch_size of them; None once closed."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                deadline = self._queue[0][0].arrived + self.max_wait
                while (self._queued_rows < self.max_batch_size and not self._closed
                       and (self._incoming > 0 or not self.announced_arrivals)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return None
                taken: list[tuple[_Request, int, int]] = []
                room = self.max_batch_size
                while self._queue and room > 0:
                    seg = self._queue[0]
                    req, start = seg
                    left_rows = len(req.rows) - start
                    if req.future.done():  # cancelled or failed earlier: skip what is left
                        self._queue.popleft()
                        self._queued_rows -= left_rows
                        continue
                    n = min(room, left_rows)
                    taken.append((req, start, start + n))
                    room -= n
                    self._queued_rows -= n
                    if n == left_rows:
                        self._queue.popleft()
                    else:
                        seg[1] = start + n  # the rest stays first in line
                if taken:
                    return taken
                # everything queued was cancelled: wait again

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            rows = [row for req, a, b in taken for row in req.rows[a:b]]
            t0 = time.perf_counter()
            try:
                preds = self.engine.classify([t for _, t in rows], [a for a, _ in rows])
            except BaseException as e:  # fail this batch's requests only
                self.errors += 1
                log.warning("batch of %d rows failed: %s", len(rows), e)
                for req, _, _ in taken:
                    _fail(req, e)
                continue
            elapsed = time.perf_counter() - t0
            pos = 0
            for req, a, b in taken:
                for i in range(a, b):
                    req.results[i] = preds[pos]
                    pos += 1
                req.remaining -= b - a
                if req.remaining == 0 and not req.future.done():
                    try:
                        req.future.set_result(req.results)  # type: ignore[arg-type]
                    except InvalidStateError:  # cancelled meanwhile
                        pass
            n_adapters = len({a.key for a, _ in rows})
            self.batches += 1
            self.rows += len(rows)
            self.recent.append(BatchRecord(len(rows), n_adapters, len({id(r) for r, _, _ in taken}), elapsed))
            if self.on_batch is not None:
                try:
                    self.on_batch(len(rows), n_adapters, elapsed)
                except Exception:  # metrics must never break serving
                    log.exception("on_batch callback failed")


def _fail(req: _Request, error: BaseException) -> None:
    if not req.future.done():
        try:
            req.future.set_exception(error)
        except InvalidStateError:
            pass
