"""Micro-batching: concurrent requests of many tenants share one forward pass.

``MicroBatcher.submit(rows)`` queues a request's ``(adapter, row input)`` rows and returns a
``concurrent.futures.Future`` of its predictions, in order. A row input is what the engine's
task decodes a raw input into (``Engine.decode_rows``: a text; a preprocessed image tensor).
One background thread forms batches of up to ``max_batch_size`` rows, waiting at most
``max_wait_ms`` after the oldest queued row arrived, and runs **one** ``engine.predict_rows``
over the merged rows (different tenants, adapters and label sets mix freely: the engine routes
every row to its own adapter). Each caller's future gets exactly its own slice. The batcher
knows no task: one batcher per engine, so rows of different tasks never share a forward pass.

Fairness (``adapters.runtime.fair_queue``):

* Rows wait in one line per tenant, and batches are formed round robin over the tenants with
  rows waiting, so one tenant's flood cannot starve another: a quiet tenant's request joins
  one of the next batches (the next one while fewer tenants than ``max_batch_size`` wait).
* ``max_queued_rows_per_tenant`` bounds one tenant's waiting rows; ``submit`` refuses more
  with ``TenantBusyError`` before queueing anything.

Fault isolation (one tenant's bad row or bad adapter never fails another tenant's request):

* ``submit`` refuses, before anything is queued, a row the engine's task says cannot join a
  shared batch (``Engine.check_row``: a text that is not valid Unicode, an image tensor of the
  wrong shape: ``InvalidInputError`` naming the row, ``inputs[i]`` / ``images[i]``) and a row
  whose adapter is of another task (``TaskMismatchError``).
* When a merged forward pass raises anyway, the batch is split in halves by request and each
  half retried, recursively, so only the requests whose rows make it raise fail (with that
  exception); every other request gets its answer. ``errors`` counts merged passes that
  raised, ``isolated`` the requests failed by a split.
* A row whose adapter gives non-finite outputs fails its own request with the engine's
  ``AdapterOutputError``; the forward pass is not repeated (rows are independent).

Other behaviour:

* With ``announced_arrivals=True`` the wait is cut short when nobody is on the way: callers
  wrap the work before their ``submit`` (parsing, authentication, adapter lookup) in
  ``with batcher.incoming():``, and the batcher waits for more rows only while such an
  announced request is pending. A ``submit`` made inside its own ``incoming()`` block (same
  thread or asyncio task) ends that announcement in the same step as it queues the rows, so a
  lone request is taken at once, never held for its own announcement to end. A lone request
  at low load therefore runs at once instead of sitting out ``max_wait_ms``; under load,
  batches fill as before.
* ``cores`` (``adapters.runtime.core_share.CoreShare``): every forward pass runs inside
  ``cores.lend()``, so a pass may use the cores the instance's other workers leave idle.
* ``compute`` (``adapters.runtime.compute_thread.ComputeThread``): the batchers of a process
  that serves several tasks run their passes (lending included) on that one shared thread, so
  the process keeps one OpenMP pool; without it a pass runs on the batcher's own thread.
* A request larger than its share of a batch is split across consecutive batches; its result
  is reassembled in order and resolved when its last row is done.
* A caller that cancels its future (e.g. a client that went away) has its remaining rows
  skipped.
* ``close()`` stops the thread; requests still queued fail with ``RuntimeError``.
* Counters: ``batches``, ``rows``, ``errors``, ``isolated``, ``recent`` (the last batches'
  sizes, distinct adapters and requests) and an ``on_batch(size, n_adapters, seconds)``
  callback for metrics. ``waiting`` is true while the thread holds a forming batch open for
  more rows, ``held`` counts the batches it held open (tests and diagnostics).

``predict(rows)`` is the asyncio face: it awaits the same future without blocking the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

from adapters.errors import AdapterOutputError
from adapters.runtime.compute_thread import ComputeThread, run_lent
from adapters.runtime.core_share import CoreShare
from adapters.runtime.engine import Engine, Prediction
from adapters.runtime.fair_queue import FairQueue
from adapters.runtime.loaded import LoadedAdapter

log = logging.getLogger("tailor.batcher")

Row = tuple[LoadedAdapter, Any]  # (adapter, row input of the engine's task)
OnBatch = Callable[[int, int, float], None]
Slice = tuple["_Request", int, int]  # a request's rows [start, stop) in one batch
Outcome = list["Prediction | AdapterOutputError | None"] | Exception


class _Arrival:
    """One announced request (``incoming()``); ``pending`` until it submits or gives up."""

    __slots__ = ("batcher", "pending")

    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher, self.pending = batcher, True


# the announcement of the request running in this context (thread or asyncio task), if any
_ARRIVAL: ContextVar[_Arrival | None] = ContextVar("tailor_batcher_arrival", default=None)


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

    @property
    def size(self) -> int:
        return len(self.rows)

    def abandoned(self) -> bool:
        return self.future.done()


class MicroBatcher:
    def __init__(
        self, engine: Engine, max_batch_size: int = 32, max_wait_ms: float = 5.0, *,
        on_batch: OnBatch | None = None, history: int = 1024, name: str = "tailor-batcher",
        announced_arrivals: bool = False, max_queued_rows_per_tenant: int | None = None,
        cores: CoreShare | None = None, compute: ComputeThread | None = None,
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
        self.cores = cores
        self.compute = compute
        self._incoming = 0  # announced requests that have not submitted yet
        self._queue: FairQueue[_Request] = FairQueue(max_queued_rows_per_tenant)
        self._cond = threading.Condition()
        self._closed = False
        self.waiting = False
        self.held = 0  # batches held open for more rows (a lone announced request never is)
        self.batches = 0
        self.rows = 0
        self.errors = 0
        self.isolated = 0
        self.recent: deque[BatchRecord] = deque(maxlen=history)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- callers ----------------------------------------------------------------------------

    def submit(self, rows: list[Row], tenant: str | None = None) -> Future[list[Prediction]]:
        """Queue ``rows``; the future resolves to one Prediction per row, in order.

        ``tenant`` is whose line the request waits in (default: the first row's adapter's
        tenant). Raises ``TypeError`` for a row that is not ``(LoadedAdapter, row input)``,
        ``InvalidInputError`` for a row input the task refuses (``Engine.check_row``),
        ``TaskMismatchError`` for an adapter of another task and ``TenantBusyError`` when the
        tenant already has too many rows waiting.
        """
        rows = list(rows)
        field = self.engine.task.input_field
        for i, row in enumerate(rows):
            if not (isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], LoadedAdapter)):
                raise TypeError(f"row {i} must be a (LoadedAdapter, row input) tuple")
            self.engine.check_row(row[1], f"{field}[{i}]")
            self.engine.check_adapter(row[0])
        req = _Request(rows, time.monotonic())
        if not rows:
            req.future.set_result([])
            return req.future
        owner = tenant if tenant is not None else rows[0][0].key.tenant
        arrival = _ARRIVAL.get()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.push(owner, req)
            if arrival is not None and arrival.batcher is self and arrival.pending:
                arrival.pending = False  # it has arrived: nothing more is on its way from it
                self._incoming -= 1
            self._cond.notify()
        return req.future

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that will ``submit`` before this block ends (or never, if it fails).
        Its ``submit`` inside the block ends the announcement (see the module doc)."""
        arrival = _Arrival(self)
        token = _ARRIVAL.set(arrival)
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            _ARRIVAL.reset(token)
            with self._cond:
                if arrival.pending:
                    arrival.pending = False
                    self._incoming -= 1
                    self._cond.notify()

    async def predict(self, rows: list[Row], tenant: str | None = None) -> list[Prediction]:
        return await asyncio.wrap_future(self.submit(rows, tenant))

    @property
    def queued_rows(self) -> int:
        return self._queue.rows

    def queued_rows_of(self, tenant: str) -> int:
        return self._queue.waiting(tenant)

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            pending = self._queue.drain()
        for req in pending:
            _fail(req, RuntimeError("the batcher was closed before this request ran"))

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the batching thread ------------------------------------------------------------------

    def _take(self) -> list[Slice] | None:
        """Wait for rows, then take up to max_batch_size of them fairly; None once closed."""
        with self._cond:
            while True:
                while not self._queue.rows and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                oldest = self._queue.oldest_arrival()
                deadline = (oldest if oldest is not None else time.monotonic()) + self.max_wait
                self.waiting = True
                held = False
                while (self._queue.rows < self.max_batch_size and not self._closed
                       and (self._incoming > 0 or not self.announced_arrivals)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    held = True
                    self._cond.wait(left)
                self.waiting = False
                self.held += held
                if self._closed:
                    return None
                taken = self._queue.take(self.max_batch_size)
                if taken:
                    return taken
                # everything queued was cancelled: wait again

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            t0 = time.perf_counter()
            outcomes = run_lent(self.compute, self.cores, partial(self._forward, taken, top=True))
            elapsed = time.perf_counter() - t0
            n_rows = sum(b - a for _, a, b in taken)
            n_adapters = len({row[0].key for req, a, b in taken for row in req.rows[a:b]})
            self.batches += 1  # counted before any caller sees its answer
            self.rows += n_rows
            self.recent.append(BatchRecord(n_rows, n_adapters, len({id(r) for r, _, _ in taken}), elapsed))
            for (req, a, b), outcome in zip(taken, outcomes):
                _deliver(req, a, b, outcome)
            if self.on_batch is not None:
                try:
                    self.on_batch(n_rows, n_adapters, elapsed)
                except Exception:  # metrics must never break serving
                    log.exception("on_batch callback failed")

    def _forward(self, part: list[Slice], top: bool = False) -> list[Outcome]:
        """One outcome per slice: its rows' results, or the exception that fails its request.

        A merged pass that raises is split in halves by request and each half retried, until
        the requests that make it raise stand alone.
        """
        rows = [row for req, a, b in part for row in req.rows[a:b]]
        try:
            results = self.engine.predict_rows([x for _, x in rows], [a for a, _ in rows])
        except Exception as e:  # noqa: BLE001 - isolated below, then given to the culprit only
            if top:
                self.errors += 1
            if len(part) == 1:
                if not top:
                    self.isolated += 1
                    log.warning("request with %d rows (adapter %s) failed alone: %s: %s", part[0][2] - part[0][1],
                                part[0][0].rows[part[0][1]][0].key, type(e).__name__, e)
                return [e]
            if top:
                log.warning("merged batch of %d rows from %d requests failed (%s: %s); isolating the culprit",
                            len(rows), len(part), type(e).__name__, e)
            mid = len(part) // 2
            return self._forward(part[:mid]) + self._forward(part[mid:])
        outcomes: list[Outcome] = []
        pos = 0
        for _, a, b in part:
            outcomes.append(results[pos : pos + b - a])
            pos += b - a
        return outcomes


def _deliver(req: _Request, a: int, b: int, outcome: Outcome) -> None:
    if isinstance(outcome, Exception):
        _fail(req, outcome)
        return
    for i, result in zip(range(a, b), outcome):
        if isinstance(result, AdapterOutputError):
            _fail(req, result)
            return
        req.results[i] = result
    req.remaining -= b - a
    if req.remaining == 0 and not req.future.done():
        try:
            req.future.set_result(req.results)  # type: ignore[arg-type]
        except InvalidStateError:  # cancelled meanwhile
            pass


def _fail(req: _Request, error: BaseException) -> None:
    if not req.future.done():
        try:
            req.future.set_exception(error)
        except InvalidStateError:
            pass
