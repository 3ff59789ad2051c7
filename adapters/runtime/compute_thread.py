"""The one thread of a process on which every task's batcher runs its forward passes.

A process that serves several task kinds has one ``MicroBatcher`` (one thread) per task. If each
ran its own multi-threaded forward passes, each thread would keep its own OpenMP pool, and with
more pool threads than cores libgomp stops spinning between ops for all of them
(``adapters.runtime.torch_threads``). Measured in one process on the 2-core box (MiniLM and
EfficientNet-Lite0 engines, a batcher each, 2 torch threads): a one-row text request took
11.3-12.3 ms (p50 of 80) until the image batcher had run one pass, then 19.8-22.2 ms, for as
long as both threads lived. So the batchers hand their passes to one ``ComputeThread``:

* ``run(fn)`` runs ``fn()`` on the compute thread and returns its result or raises its
  exception on the caller's thread; callers wait their turn (passes of different tasks never
  overlap, which on a CPU they could not do faster anyway). Called on the compute thread itself
  it just calls ``fn``.
* Work runs in the order it was handed in. What a pass sets on its thread (torch's intra-op
  thread count, ``CoreShare.lend``) is set on the compute thread, so the lending happens there.
* ``close()`` lets queued work finish, then stops the thread; ``run`` afterwards raises
  ``RuntimeError``. One per process (the service's state owns it); a library user with one
  batcher needs none (the batcher then runs passes on its own thread).
* ``run_lent(compute, cores, fn)`` is how a forward pass (a batch, a generation step) runs:
  on ``compute`` when there is one, else on the caller's thread, inside ``cores.lend()`` when
  there are cores to lend.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any, TypeVar

from adapters.runtime.core_share import CoreShare

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "tailor-compute") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the compute thread is closed")
            self._jobs.put((fn, future))
        return future.result()

    def close(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> ComputeThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the caller re-raises it
                future.set_exception(e)


def run_lent(compute: ComputeThread | None, cores: CoreShare | None, fn: Callable[[], T]) -> T:
    """``fn()`` on ``compute`` (else here), inside ``cores.lend()`` (if any): one forward pass."""
    def lent() -> T:
        with cores.lend() if cores is not None else nullcontext():
            return fn()
    return lent() if compute is None else compute.run(lent)
