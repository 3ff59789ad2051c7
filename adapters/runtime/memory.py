"""Host-memory layout for thousands of resident adapters.

Two measures keep a resident adapter at about its tensor bytes (measured: ~600 KB of RSS per
300 KB adapter without them, ~1.06x its bytes with them):

* ``pack`` copies an adapter's tensors into ONE contiguous buffer and returns views into it:
  one allocation per adapter instead of one per tensor, so nothing small is left behind when
  it is evicted.
* ``tune_allocator`` fixes glibc's mmap threshold at 64 KiB. glibc otherwise raises the
  threshold after the first large free, so every later ~300 KB buffer (the file bytes read,
  the packed adapter) comes from the heap, which fragments and is never returned to the OS.
  With the threshold fixed, such buffers are mmapped and freed back on eviction. It is a
  process-wide allocator setting (not Python state), applied once; a no-op off glibc.

A serving process also needs its heap handed back as it goes, or freed memory stays with the
allocator under a steady mix of requests (side by side for 5 minutes under the soak's traffic:
+5.5 MB without the measures below, -0.5 MB with them). The soak's larger growth, ~0.5 MB/s for
five minutes then level, has the shape of BentoML's request timeout keeping every request for
its 300 s (fixed in ``service.request_timeout``), not the allocator's. Two more measures:

* ``tune_allocator`` also caps glibc's arenas at ``ARENA_MAX`` (2): by default every thread
  that allocates may get its own arena, up to 8 per core (the request thread pool alone has
  40 threads), and each keeps its own free memory.
* ``HeapTrimmer`` calls ``malloc_trim(0)`` at most every ``interval_s`` seconds (a background
  thread's call, ``adapters.runtime.resolver.Freshener``): glibc then returns the free pages
  of every arena to the OS. It costs a few milliseconds on a ~1 GB heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
_tuned = False


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_allocator(threshold: int = 64 * 1024, arena_max: int = ARENA_MAX) -> bool:
    global _tuned  # process-wide by nature: the C allocator has one setting per process
    if _tuned:
        return True
    try:
        libc = _libc()
        _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
        if arena_max > 0:
            libc.mallopt(_M_ARENA_MAX, arena_max)
    except (OSError, AttributeError):
        log.info("malloc tuning unavailable on this platform")
    return _tuned


def trim_heap() -> bool:
    """Give the allocator's free pages back to the OS (glibc ``malloc_trim(0)``); False off glibc."""
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


class HeapTrimmer:
    """Callable: ``trim()`` (default ``trim_heap``) when ``interval_s`` has passed since the last one."""

    def __init__(self, interval_s: float = 30.0, *, trim: Callable[[], bool] = trim_heap,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self._trim, self._clock = interval_s, trim, clock
        self._last = clock()
        self.trims = 0

    def __call__(self) -> None:
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self._trim()
            self.trims += 1


def pack(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The same tensors (cast to ``dtype``) as views of one contiguous buffer."""
    total = sum(t.numel() for t in tensors)
    flat = torch.empty(total, dtype=dtype)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        view = flat[offset : offset + n].view(t.shape)
        view.copy_(t)
        out.append(view)
        offset += n
    return out
