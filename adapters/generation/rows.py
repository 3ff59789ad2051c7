"""The running batch's per-row LoRA weights, kept in place across decode steps.

Contract:

* ``RowLoras(linear_shapes, device, dtype, max_rows, separate=...)`` holds, for the scheduler's
  active rows (row ``i`` is KV row ``i``), each row's LoRA weights laid out for the mixed forward
  (``adapters.runtime.context``): per group of sibling layers that read one input (a decoder's
  q/k/v; gate/up; ``separate`` names, e.g. ``o_proj`` and ``down_proj``, alone) ``A`` stored
  transposed, ``[C, d_in]`` (peft's own orientation, the group's modules one above the other in
  ``C``; the plan hands the forward its ``[d_in, C]`` view: the per-row ``x @ A`` then reads
  ``C`` contiguous dot products of length ``d_in``, measured ~20-40% faster than the
  ``[d_in, C]`` layout's narrow rows on CPU), per layer ``B [R, d_out]`` with the adapter's
  scale folded in. A base-model row, or a module its adapter does not target, is zeros there; a
  smaller rank is zero-padded: every padding is exact.
* One row is one contiguous stretch of a ``[rows_cap, row_numel]`` buffer, so ``append(adapters)``
  (new rows after the live ones; ``None``: the base model) costs one copy per row, from the
  adapter's row image (laid out once per adapter and layout, the last ``max_rows`` kept), and
  ``remove(i)`` fills row ``i``'s hole with the last row (the order ``KVCache.move_row`` keeps):
  one copy. ``reset()`` drops every row but keeps the buffer and its layout (the scheduler's
  batch emptied; a batch that refills soon reuses them: no allocation, no first-touch of
  hundreds of MB); ``clear()`` frees the buffer and the layout (the scheduler calls it once
  the engine has been idle a while: an idle engine holds no rows). Nothing
  else copies weights: a decode step without a join or a leave gathers nothing (``rows_written``
  counts row copies, ``relayouts`` the re-lays, for tests and benchmarks). The buffer has
  ``max_rows`` rows from the start, allocated empty (on CPU a row's pages are first touched when
  it is written, so a small batch holds little; on CUDA the whole buffer is reserved): there is
  no grow-and-copy of live rows; a rank wider than the layout's re-lays every live row.
  A base-model row is zeroed lazily, by the first ``plan`` that covers it (``rows_zeroed``
  counts those fills): a batch of base rows alone, or a base row moved into a hole, writes
  nothing, so base-only traffic pays nothing for a buffer kept from an earlier mixed batch.
* ``plan(start, stop)`` is a ``BatchPlan`` over rows ``start..stop-1`` whose tensors are views of
  the buffer (never copies), or ``None`` when none of those rows has an adapter (the plain base
  forward). A plan is valid until the next ``append`` / ``remove`` / ``clear``; the last one is
  reused while the rows do not change (its groups keep their decode-step ``x @ A`` buffer,
  ``GroupPlan.keep_out``: a decode step allocates nothing there). One thread (the scheduler's)
  owns an instance.
* ``drop_images(match)`` forgets the cached row images of the versions ``match`` selects (the
  engine calls it when an adapter is deleted or replaced, so a gone adapter's image does not
  outlive it; rows already live keep their own copy). It may be called from any thread;
  ``image_keys()`` lists what is cached.
* Adapters are read from ``LoadedAdapter.lora`` (peft orientation: ``A [r, d_in]``,
  ``B [d_out, r]``) and must target paths of ``linear_shapes`` (the engine checks them first).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters.runtime.context import BatchPlan, GroupPlan, ModulePlan
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.slots import sibling_groups


@dataclass
class _Group:
    paths: list[str]  # modules in column order
    d_in: int
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (column offset, rank cap)
    at: int = 0  # where its A [d_in, width] starts in a row

    @property
    def width(self) -> int:
        return sum(cap for _, cap in self.spans.values())


class RowLoras:
    def __init__(self, linear_shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype,
                 max_rows: int, separate: tuple[str, ...] = ()) -> None:
        self.shapes = dict(linear_shapes)
        self.device, self.dtype = device, dtype
        self.max_rows = max_rows
        self._groups = {name: _Group(paths=paths, d_in=d_in)
                        for name, (d_in, paths) in sibling_groups(linear_shapes, separate).items()}
        self._group_of = {path: g for g in self._groups.values() for path in g.paths}
        self._b_at: dict[str, int] = {}  # path -> where its B [rank cap, d_out] starts in a row
        self._numel = 0
        self._layout: tuple[tuple[str, int], ...] = ()  # (path, rank cap): what an image was laid for
        self._flat: torch.Tensor | None = None  # [rows_cap, numel]
        self._images: OrderedDict[VersionKey, tuple[tuple[tuple[str, int], ...], torch.Tensor]] = OrderedDict()
        self._images_lock = threading.Lock()  # drop_images comes from other threads
        self.rows: list[LoadedAdapter | None] = []
        self._targets: Counter[str] = Counter()  # live rows whose adapter targets each module
        self.rows_written = 0
        self.rows_zeroed = 0
        self._stale: set[int] = set()  # base rows not zeroed yet (plan zeroes the ones it covers)
        self.relayouts = 0
        self._plan_key: tuple[int, int] | None = None
        self._plan: BatchPlan | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def rows_cap(self) -> int:
        return 0 if self._flat is None else self._flat.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes the row buffer takes (the row images' cache aside)."""
        return 0 if self._flat is None else self._flat.nbytes

    @property
    def live(self) -> torch.Tensor | None:
        """The live rows' weights, ``[len(self), row_numel]``: a view of the buffer (read-only use;
        None before the first row). What a mixed step over all of them reads at least once."""
        return None if self._flat is None else self._flat[: len(self.rows)]

    # -- composition changes --------------------------------------------------------------------

    @torch.inference_mode()
    def append(self, adapters: list[LoadedAdapter | None]) -> None:
        n = len(self.rows) + len(adapters)
        if n > self.max_rows:
            raise ValueError(f"{n} rows exceed the batch's {self.max_rows}")
        caps = {p: c for g in self._groups.values() for p, (_, c) in g.spans.items()}
        wider = dict(caps)
        for adapter in adapters:
            for path, (a, _) in (adapter.lora.items() if adapter is not None else ()):
                if a.shape[0] > wider.get(path, 0):
                    old = caps.get(path, 0)
                    wider[path] = max(a.shape[0], 2 * old) if old else a.shape[0]
        if wider != caps:
            self._relayout(wider)
        elif self._flat is None:
            self._flat = torch.empty(self.max_rows, self._numel, device=self.device, dtype=self.dtype)
        for adapter in adapters:
            self._write(len(self.rows), adapter)
            self.rows.append(adapter)
            self._count(adapter, +1)
        self._plan_key = None

    @torch.inference_mode()
    def remove(self, i: int) -> None:
        last = len(self.rows) - 1
        self._count(self.rows[i], -1)
        if i != last:
            if last in self._stale:  # a base row not zeroed yet moves: it stays to be zeroed
                self._stale.add(i)
            else:
                self._stale.discard(i)
                if self._flat is not None:
                    self._flat[i].copy_(self._flat[last])
            self.rows[i] = self.rows[last]
            self.rows_written += 1
        self._stale.discard(last)
        self.rows.pop()
        self._plan_key = None

    def clear(self) -> None:
        """Free the buffer and forget the layout (the row images stay, for their layout)."""
        for g in self._groups.values():
            g.spans, g.at = {}, 0
        self._b_at, self._numel, self._layout, self._flat = {}, 0, (), None
        self.rows, self._targets, self._stale = [], Counter(), set()
        self._plan_key, self._plan = None, None

    def drop_images(self, match: Callable[[VersionKey], bool]) -> None:
        with self._images_lock:
            for key in [k for k in self._images if match(k)]:
                del self._images[key]

    def image_keys(self) -> list[VersionKey]:
        with self._images_lock:
            return list(self._images)

    def reset(self) -> None:
        """Drop every row; keep the buffer, its layout and the row images."""
        self.rows, self._targets, self._stale = [], Counter(), set()
        self._plan_key, self._plan = None, None

    # -- the forward's view ---------------------------------------------------------------------

    @torch.inference_mode()
    def plan(self, start: int, stop: int) -> BatchPlan | None:
        if self._plan_key == (start, stop):
            return self._plan
        plan = None
        if self._flat is not None and any(a is not None for a in self.rows[start:stop]):
            for i in sorted(i for i in self._stale if start <= i < stop):
                self._flat[i].zero_()
                self._stale.discard(i)
                self.rows_zeroed += 1
            rows = self._flat[start:stop]
            modules: dict[str, ModulePlan] = {}
            for g in self._groups.values():
                active = [p for p in g.paths if self._targets[p] > 0]
                if not active:
                    continue
                a_t = rows[:, g.at : g.at + g.width * g.d_in].view(-1, g.width, g.d_in)
                gp = GroupPlan(a=a_t.transpose(1, 2), single=False, keep_out=True)  # [rows, d_in, C], a view
                for p in active:
                    off, cap = g.spans[p]
                    at, d_out = self._b_at[p], self.shapes[p][1]
                    modules[p] = ModulePlan(group=gp, start=off, stop=off + cap,
                                            b=rows[:, at : at + cap * d_out].view(-1, cap, d_out))
            empty = torch.zeros(0, device=self.device, dtype=self.dtype)
            plan = BatchPlan(modules=modules, head_weight=empty, head_bias=empty, single=False)
        self._plan_key, self._plan = (start, stop), plan
        return plan

    # -- internals ------------------------------------------------------------------------------

    def _count(self, adapter: LoadedAdapter | None, d: int) -> None:
        if adapter is not None:
            for path in adapter.lora:
                self._targets[path] += d

    def _write(self, i: int, adapter: LoadedAdapter | None) -> None:
        assert self._flat is not None
        if adapter is None:
            self._stale.add(i)  # zeroed by the first plan that reads it
        else:
            self._flat[i].copy_(self._image(adapter))
            self._stale.discard(i)
        self.rows_written += 1

    def _image(self, adapter: LoadedAdapter) -> torch.Tensor:
        """The adapter's row, laid out for the current layout (cached: the last ``max_rows``)."""
        with self._images_lock:
            hit = self._images.get(adapter.key)
            if hit is not None and hit[0] == self._layout:
                self._images.move_to_end(adapter.key)
                return hit[1]
        row = torch.zeros(self._numel, device=self.device, dtype=self.dtype)
        for path, (a_mat, b_mat) in adapter.lora.items():
            g = self._group_of[path]
            off, cap = g.spans[path]
            r = a_mat.shape[0]
            a_t = row[g.at : g.at + g.width * g.d_in].view(g.width, g.d_in)
            a_t[off : off + r].copy_(a_mat)
            at, d_out = self._b_at[path], self.shapes[path][1]
            b = row[at : at + cap * d_out].view(cap, d_out)
            torch.mul(b_mat.t().to(self.device), adapter.scale, out=b[:r])
        with self._images_lock:
            self._images[adapter.key] = (self._layout, row)
            self._images.move_to_end(adapter.key)
            while len(self._images) > self.max_rows:
                self._images.popitem(last=False)
        return row

    def _relayout(self, caps: dict[str, int]) -> None:
        """Lay rows out for ``caps`` (path -> rank columns) and rewrite the live rows so."""
        at = 0
        for g in self._groups.values():
            g.spans, off = {}, 0
            for p in g.paths:
                if p in caps:
                    g.spans[p] = (off, caps[p])
                    off += caps[p]
            g.at = at
            at += g.d_in * off
        self._b_at = {}
        for g in self._groups.values():
            for p, (_, cap) in g.spans.items():
                self._b_at[p] = at
                at += cap * self.shapes[p][1]
        self._numel = at
        self._layout = tuple((p, c) for g in self._groups.values() for p, (_, c) in g.spans.items())
        # all max_rows rows at once, empty: a row's pages are first touched when it is written (on
        # CPU an untouched page takes no memory), so there is never a grow-and-copy of live rows
        self._flat = torch.empty(self.max_rows, self._numel, device=self.device, dtype=self.dtype)
        self.relayouts += 1
        self._stale = {i for i, adapter in enumerate(self.rows) if adapter is None}
        for i, adapter in enumerate(self.rows):
            if adapter is not None:
                self._write(i, adapter)
