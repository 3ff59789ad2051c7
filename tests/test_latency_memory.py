"""The serving process hands freed heap back to the OS: ``trim_heap`` and its ``HeapTrimmer``."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from adapters.runtime.memory import HeapTrimmer, trim_heap

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_trim_heap_returns_freed_heap_memory_the_allocator_kept() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 32 * 1024, 6400  # 200 MiB in blocks below the mmap threshold: from the heap
    blocks = [libc.malloc(block) for _ in range(count)]
    pin = libc.malloc(block)  # above them: the heap's top stays in use, so free() cannot shrink it
    for b in blocks:
        ctypes.memset(b, 1, block)  # touch every page
    libc.free(None)
    for b in blocks:
        libc.free(b)
    kept = rss_bytes()
    trim_heap()
    returned = kept - rss_bytes()
    libc.free(pin)
    assert returned > 100 * 2**20, f"only {returned / 2**20:.0f} MiB of 200 freed MiB went back to the OS"


def test_the_trimmer_trims_at_most_once_per_interval() -> None:
    now = [0.0]
    calls: list[float] = []
    trimmer = HeapTrimmer(30.0, trim=lambda: calls.append(now[0]) or True, clock=lambda: now[0])
    for t in (1.0, 29.9, 30.0, 31.0, 59.9, 60.5):
        now[0] = t
        trimmer()
    assert calls == [30.0, 60.5] and trimmer.trims == 2
