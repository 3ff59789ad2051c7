"""The serving process hands memory back to the OS: ``trim_heap`` and its ``HeapTrimmer`` for the
heap, ``pack``'s own mappings for evicted adapters."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
import torch

from adapters.runtime.memory import OWN_MAPPING_BYTES, HeapTrimmer, pack, trim_heap

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


def _mapping_starts() -> set[int]:
    with open("/proc/self/maps") as f:
        return {int(line.split("-", 1)[0], 16) for line in f}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_a_packed_adapter_is_its_own_mapping_and_is_unmapped_when_it_dies() -> None:
    """Whatever malloc's threshold does (glibc raises it after a large free, and an adapter
    buffer would then stay in the heap after eviction), a large packed adapter is an mmap of
    its own: page-aligned, gone from the address space once its last view dies."""
    big = torch.empty(8 << 20, dtype=torch.uint8)
    del big  # a large free: glibc's dynamic threshold rises above every adapter size below
    parts = [torch.randn(8, 384), torch.randn(384, 8), torch.randn(3, 384), torch.randn(3)]
    adapters = [pack(parts * 4, torch.float32) for _ in range(40)]
    for views in adapters:
        assert all(torch.equal(v, t) for v, t in zip(views, parts * 4))
    starts = {views[0].untyped_storage().data_ptr() for views in adapters}
    assert all(p % PAGE == 0 for p in starts)
    assert starts <= _mapping_starts(), "a packed adapter is not a mapping of its own"
    del adapters, views
    assert not starts & _mapping_starts(), "an adapter's mapping outlived its views"


def test_a_small_packed_adapter_stays_a_plain_allocation() -> None:
    views = pack([torch.ones(4), torch.zeros(2, 3)], torch.bfloat16)
    assert views[0].dtype == torch.bfloat16 and views[1].shape == (2, 3) and float(views[0].sum()) == 4
    assert views[0].untyped_storage().nbytes() < OWN_MAPPING_BYTES
