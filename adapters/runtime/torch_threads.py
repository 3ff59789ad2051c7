"""OpenMP thread pools: one live pool per process, or every forward pass slows down.

PyTorch's CPU build runs its parallel ops on GNU OpenMP (libgomp), which keeps **one pool of
worker threads per thread that ever ran a parallel region**, for as long as that thread lives.
While a process's pools hold more threads than it has cores, libgomp stops spinning between
regions (its "throttled" spin count, 100 iterations; ``GOMP_SPINCOUNT`` and
``OMP_WAIT_POLICY`` cannot raise it): every op's fork and join become futex sleeps and wakes.
Measured on the 2-core box, 2 torch threads: after the main thread had run one parallel op,
a second thread's 196k-float add took 86-104 us instead of 12-15 us, a GELU 147-170 us instead
of 54-66 us, a 128x384x1536 matmul 662-695 us instead of 575-606 us, and MiniLM's one-row
forward pass (128 tokens) 29-30 ms instead of 18.5-20 ms; the thread alone (main never ran a
parallel op, or ran them with one thread) was as fast as main.

So a process that serves from a scheduler or batcher thread must not leave another pool alive:

* one-off parallel work (loading a base, a reference measurement, a peft comparison in a
  benchmark) runs on a thread that then exits (``on_fresh_thread``), which frees its pool;
* request-side work (decoding and checking an image on a request thread, or on the event loop)
  runs inside ``one_thread()``: torch's threads of the calling thread are 1 for the block (no
  pool is made for a one-thread region), then what they were. One 224 px image's preprocessing
  and finiteness check on a request thread otherwise left a pool behind that doubled the text
  batcher's forward time;
* forward passes of every task run on one shared thread (``adapters.runtime.compute_thread``).

What a caller may assume: ``on_fresh_thread`` returns what ``fn`` returned or raises what it
raised, on the caller's thread, after the fresh thread (and its pool) is gone. ``one_thread``
changes only the calling thread's OpenMP setting (and torch's default for threads that have not
run a parallel op yet, for the block's duration).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def on_fresh_thread(fn: Callable[..., T], *args: Any, name: str = "tailor-once", **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new thread that exits afterwards (its OpenMP pool with it)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextmanager
def one_thread() -> Iterator[None]:
    """The block's torch ops on the calling thread run single-threaded (no OpenMP pool)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
