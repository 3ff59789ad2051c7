"""The running batch's per-row LoRA weights, kept in place across decode steps.

Contract:

* ``RowLoras(linear_shapes, device, dtype, max_rows, separate=...)`` holds, for the scheduler's
  active rows (row ``i`` is KV row ``i``), each row's LoRA weights laid out for the mixed forward
  (``adapters.runtime.context``): per group of sibling layers that read one input (a decoder's
  q/k/v; gate/up; ``separate`` names, e.g. ``o_proj`` and ``down_proj``, alone) ``A [rows_cap,
  d_in, C]`` with the group's modules side by side in ``C``, per layer ``B [rows_cap, R, d_out]``
  with the adapter's scale folded in. A base-model row, or a module its adapter does not target,
  is zeros there; a smaller rank is zero-padded: every padding is exact.
* ``append(adapters)`` writes new rows after the live ones (``None``: the base model): each
  costs one copy of its own adapter's bytes. ``remove(i)`` fills row ``i``'s hole with the last
  row (the order ``KVCache.move_row`` keeps): one row's copy. ``clear()`` frees the buffers (an
  idle engine holds none). Nothing else copies weights: a decode step without a join or a leave
  gathers nothing (``rows_written`` counts row copies, for tests and benchmarks). The row
  capacity (at most ``max_rows``) and per-module ranks grow on demand, copying the live rows once.
* ``plan(start, stop)`` is a ``BatchPlan`` over rows ``start..stop-1`` whose tensors are views of
  the buffers (never copies), or ``None`` when none of those rows has an adapter (the plain base
  forward). A plan is valid until the next ``append`` / ``remove`` / ``clear``; the last one is
  reused while the rows do not change. One thread (the scheduler's) owns an instance.
* Adapters are read from ``LoadedAdapter.lora`` (peft orientation: ``A [r, d_in]``,
  ``B [d_out, r]``) and must target paths of ``linear_shapes`` (the engine checks them first).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from adapters.runtime.context import BatchPlan, GroupPlan, ModulePlan
from adapters.runtime.loaded import LoadedAdapter


@dataclass
class _Group:
    paths: list[str]  # modules in column order
    d_in: int
    a: torch.Tensor | None = None  # [rows_cap, d_in, width]
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (offset, rank cap)

    @property
    def width(self) -> int:
        return sum(cap for _, cap in self.spans.values())


class RowLoras:
    def __init__(self, linear_shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype,
                 max_rows: int, separate: tuple[str, ...] = ()) -> None:
        self.shapes = dict(linear_shapes)
        self.device, self.dtype = device, dtype
        self.max_rows = max_rows
        self._groups: dict[str, _Group] = {}
        self._group_of: dict[str, _Group] = {}
        for path, (d_in, _) in linear_shapes.items():
            key = path if path.rpartition(".")[2] in separate else path.rpartition(".")[0]
            g = self._groups.setdefault(key, _Group(paths=[], d_in=d_in))
            if g.d_in != d_in:  # siblings with different inputs cannot share x @ A
                g = self._groups.setdefault(path, _Group(paths=[], d_in=d_in))
            g.paths.append(path)
            self._group_of[path] = g
        self._b: dict[str, torch.Tensor] = {}  # path -> [rows_cap, rank cap, d_out]
        self.rows: list[LoadedAdapter | None] = []
        self._targets: Counter[str] = Counter()  # live rows whose adapter targets each module
        self.rows_cap = 0
        self.rows_written = 0
        self._plan_key: tuple[int, int] | None = None
        self._plan: BatchPlan | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        ts = list(self._b.values()) + [g.a for g in self._groups.values() if g.a is not None]
        return sum(t.nbytes for t in ts)

    # -- composition changes --------------------------------------------------------------------

    @torch.inference_mode()
    def append(self, adapters: list[LoadedAdapter | None]) -> None:
        n = len(self.rows) + len(adapters)
        if n > self.max_rows:
            raise ValueError(f"{n} rows exceed the batch's {self.max_rows}")
        for adapter in adapters:
            for path, (a, _) in (adapter.lora.items() if adapter is not None else ()):
                self._grow_rank(path, a.shape[0])
        if n > self.rows_cap:
            self._grow_rows(min(self.max_rows, max(n, 2 * self.rows_cap, 8)))
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
            for t in self._tensors():
                t[i].copy_(t[last])
            self.rows[i] = self.rows[last]
            self.rows_written += 1
        self.rows.pop()
        self._plan_key = None

    def clear(self) -> None:
        for g in self._groups.values():
            g.a, g.spans = None, {}
        self._b = {}
        self.rows, self._targets = [], Counter()
        self.rows_cap = 0
        self._plan_key, self._plan = None, None

    # -- the forward's view ---------------------------------------------------------------------

    @torch.inference_mode()
    def plan(self, start: int, stop: int) -> BatchPlan | None:
        if self._plan_key == (start, stop):
            return self._plan
        plan = None
        if any(a is not None for a in self.rows[start:stop]):
            modules: dict[str, ModulePlan] = {}
            for g in self._groups.values():
                active = [p for p in g.paths if self._targets[p] > 0]
                if not active or g.a is None:
                    continue
                gp = GroupPlan(a=g.a[start:stop], single=False)
                for p in active:
                    off, cap = g.spans[p]
                    modules[p] = ModulePlan(group=gp, start=off, stop=off + cap, b=self._b[p][start:stop])
            empty = torch.zeros(0, device=self.device, dtype=self.dtype)
            plan = BatchPlan(modules=modules, head_weight=empty, head_bias=empty, single=False)
        self._plan_key, self._plan = (start, stop), plan
        return plan

    # -- internals ------------------------------------------------------------------------------

    def _tensors(self) -> list[torch.Tensor]:
        return [g.a for g in self._groups.values() if g.a is not None] + list(self._b.values())

    def _count(self, adapter: LoadedAdapter | None, d: int) -> None:
        if adapter is not None:
            for path in adapter.lora:
                self._targets[path] += d

    def _write(self, i: int, adapter: LoadedAdapter | None) -> None:
        lora = adapter.lora if adapter is not None else {}
        for g in self._groups.values():
            if g.a is None:
                continue
            for path in g.paths:
                if path not in g.spans:
                    continue
                off, cap = g.spans[path]
                b = self._b[path]
                if path not in lora:
                    g.a[i, :, off : off + cap].zero_()
                    b[i].zero_()
                    continue
                a_mat, b_mat = lora[path]
                r = a_mat.shape[0]
                g.a[i, :, off : off + r].copy_(a_mat.t())
                g.a[i, :, off + r : off + cap].zero_()
                torch.mul(b_mat.t().to(self.device), adapter.scale, out=b[i, :r])  # type: ignore[union-attr]
                b[i, r:].zero_()
        self.rows_written += 1

    def _grow_rows(self, cap: int) -> None:
        live = len(self.rows)
        for g in self._groups.values():
            if g.a is not None:
                g.a = _regrow(g.a, cap, live)
        for p, b in self._b.items():
            self._b[p] = _regrow(b, cap, live)
        self.rows_cap = cap

    def _grow_rank(self, path: str, r: int) -> None:
        g = self._group_of[path]
        old_cap = g.spans.get(path, (0, 0))[1]
        if r <= old_cap:
            return
        live, rows_cap = len(self.rows), max(self.rows_cap, 1)
        old_spans, old_a = dict(g.spans), g.a
        g.spans[path] = (0, max(r, 2 * old_cap) if old_cap else r)
        off = 0
        for p in g.paths:  # columns in module order
            if p in g.spans:
                g.spans[p] = (off, g.spans[p][1])
                off += g.spans[p][1]
        g.a = torch.zeros(rows_cap, g.d_in, off, device=self.device, dtype=self.dtype)
        if old_a is not None and live:
            for p, (o, c) in old_spans.items():
                n = g.spans[p][0]
                g.a[:live, :, n : n + c].copy_(old_a[:live, :, o : o + c])
        new_b = torch.zeros(rows_cap, g.spans[path][1], self.shapes[path][1], device=self.device, dtype=self.dtype)
        if path in self._b and live:
            new_b[:live, :old_cap].copy_(self._b[path][:live])
        self._b[path] = new_b
        self.rows_cap = rows_cap


def _regrow(old: torch.Tensor, rows: int, live: int) -> torch.Tensor:
    """``old`` with ``rows`` rows (first dimension), its first ``live`` rows kept."""
    new = torch.zeros((rows, *old.shape[1:]), device=old.device, dtype=old.dtype)
    new[:live].copy_(old[:live])
    return new
