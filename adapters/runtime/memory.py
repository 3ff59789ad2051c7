"""Host-memory layout for thousands of resident adapters.

Two measures keep a resident adapter at about its tensor bytes (measured: ~600 KB of RSS per
300 KB adapter without them, ~1.06x its bytes with them):

* ``pack`` copies an adapter's tensors into ONE contiguous buffer and returns views into it:
  one allocation per adapter instead of one per tensor, so nothing small is left behind when
  it is evicted.
* That buffer, when it is at least ``OWN_MAPPING_BYTES``, is its own anonymous memory mapping
  (``mmap``), not a ``malloc`` block: it costs its bytes rounded up to a page, and the pages go
  back to the OS when the last view of it dies (eviction), whatever the C allocator does.

glibc's own mmap threshold is left dynamic (its default). Fixing it at 64 KiB, as this module
once did to keep adapter buffers out of the heap, made every activation above 64 KiB a fresh
mmap, page-faulted in and unmapped op by op: MiniLM's base forward on 2 threads ran 1.27x slower
at 32 rows x 128 tokens and 1.5x slower at one row (174k vs 48-55k minor faults per 32-row pass),
and a generation step on the scheduler's thread paid ~600 mmap/munmap pairs. With the dynamic
threshold, activations are reused from the heap after the first pass; adapters no longer depend
on the threshold, since their buffers bypass malloc.

A serving process also needs its heap handed back as it goes, or freed memory stays with the
allocator under a steady mix of requests (side by side for 5 minutes under the soak's traffic:
+5.5 MB without the measures below, -0.5 MB with them). The soak's larger growth, ~0.5 MB/s for
five minutes then level, has the shape of BentoML's request timeout keeping every request for
its 300 s (fixed in ``service.request_timeout``), not the allocator's. Two more measures:

* ``tune_allocator`` caps glibc's arenas at ``ARENA_MAX`` (2): by default every thread that
  allocates may get its own arena, up to 8 per core (the request thread pool alone has 40
  threads), and each keeps its own free memory. It is a process-wide allocator setting (not
  Python state), applied once; a no-op off glibc.
* ``HeapTrimmer`` calls ``malloc_trim(0)`` at most every ``interval_s`` seconds (a background
  thread's call, ``adapters.runtime.resolver.Freshener``): glibc then returns the free pages
  of every arena to the OS. It costs a few milliseconds on a ~1 GB heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
OWN_MAPPING_BYTES = 64 * 1024  # a packed adapter at least this big gets its own mapping
_tuned = False


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_allocator(threshold: int | None = None, arena_max: int = ARENA_MAX) -> bool:
    """Cap glibc's arenas at ``arena_max``; ``threshold`` (bytes) also fixes its mmap threshold,
    which turns off glibc's dynamic one (not by default: see the module docstring). Applied once
    per process; False off glibc."""
    global _tuned  # process-wide by nature: the C allocator has one setting per process
    if _tuned:
        return True
    try:
        libc = _libc()
        ok = bool(libc.mallopt(_M_ARENA_MAX, arena_max)) if arena_max > 0 else True
        if threshold is not None:
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and ok
        _tuned = ok
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


def host_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory as a uint8 tensor: its own anonymous mapping from
    ``OWN_MAPPING_BYTES`` on (page-aligned, unmapped when the last tensor viewing it dies),
    a ``torch.empty`` below that."""
    if nbytes < OWN_MAPPING_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)  # the tensor keeps the map alive


def pack(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The same tensors (cast to ``dtype``) as views of one contiguous host buffer
    (``host_buffer``: its own mapping when large)."""
    total = sum(t.numel() for t in tensors)
    size = torch.empty(0, dtype=dtype).element_size()
    flat = host_buffer(max(1, total) * size).view(dtype)[:total]
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        view = flat[offset : offset + n].view(t.shape)
        view.copy_(t)
        out.append(view)
        offset += n
    return out
