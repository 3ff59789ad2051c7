"""The hot set: adapters resident on the device as rows of stacked weight tensors.

``SlotBank`` owns, per group of sibling layers, a tensor ``A [slots, d_in, C]`` (the group's
modules side by side in ``C``), per layer ``B [slots, R, d_out]`` and the stacked heads
``W [slots, H, L]``, ``b [slots, L]``. Slot 0 is all zeros and serves base-model rows; a slot
holding an adapter that does not target a layer is zero there, and smaller ranks/label sets
are zero-padded, so every padding is exact. Rank and label capacity grow on demand.

``plan()`` is the only read path: under the bank's lock it assigns slots to the batch's
adapters (evicting least-recently-used slots not in the batch) and gathers the rows the
batch needs into a ``BatchPlan``. The forward then reads only the gathered copies, so slots
may be reassigned the moment ``plan()`` returns. A batch may name at most ``capacity - 1``
distinct adapters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters.errors import CapacityError
from adapters.runtime.context import BatchPlan, GroupPlan, ModulePlan
from adapters.runtime.loaded import LoadedAdapter, VersionKey


def sibling_groups(linear_shapes: dict[str, tuple[int, int]],
                   separate: tuple[str, ...] = ()) -> dict[str, tuple[int, list[str]]]:
    """Which adapted layers share one down-projection gather: group name -> (d_in, paths in
    column order). Siblings under one parent module with the same input width share a group
    named after the parent; a sibling with another width, or whose last path part is in
    ``separate`` (it reads another input), is a group of its own named after its path. Every
    mixed-batch path (``SlotBank``, the generation ``RowLoras``, the ONNX ``GraphLayout``) groups
    with this one rule, so their group names and column orders agree."""
    groups: dict[str, tuple[int, list[str]]] = {}
    for path, (d_in, _) in linear_shapes.items():
        name = path if path.rpartition(".")[2] in separate else path.rpartition(".")[0]
        if name in groups and groups[name][0] != d_in:
            name = path
        groups.setdefault(name, (d_in, []))[1].append(path)
    return groups


@dataclass
class _Group:
    paths: list[str]  # modules in column order
    d_in: int
    rank_cap: dict[str, int] = field(default_factory=dict)  # path -> columns reserved
    a: torch.Tensor | None = None

    def offset(self, path: str) -> int:
        off = 0
        for p in self.paths:
            if p == path:
                return off
            off += self.rank_cap.get(p, 0)
        raise KeyError(path)

    @property
    def width(self) -> int:
        return sum(self.rank_cap.values())


class SlotBank:
    def __init__(
        self, linear_shapes: dict[str, tuple[int, int]], head_in_features: int, capacity: int,
        device: torch.device, dtype: torch.dtype, separate: tuple[str, ...] = (),
    ) -> None:
        """``separate``: module names (last path part) that read another input than their
        siblings (a decoder's ``o_proj`` reads the attention output, not q/k/v's input): each
        gets a group of its own, so its siblings' down-projection is not recomputed for it."""
        if capacity < 2:
            raise ValueError("a slot bank needs at least 2 slots (slot 0 is the base model)")
        self.capacity = capacity
        self.device, self.dtype = device, dtype
        self.shapes = linear_shapes
        self._groups = {name: _Group(paths=paths, d_in=d_in)
                        for name, (d_in, paths) in sibling_groups(linear_shapes, separate).items()}
        self._group_of = {path: name for name, g in self._groups.items() for path in g.paths}
        self._b: dict[str, torch.Tensor] = {}
        self._head_w = torch.zeros(capacity, head_in_features, 0, device=device, dtype=dtype)
        self._head_b = torch.zeros(capacity, 0, device=device, dtype=dtype)
        self._slot_of: OrderedDict[VersionKey, int] = OrderedDict()  # LRU order, oldest first
        self._holder: dict[int, LoadedAdapter] = {}
        self._free = list(range(capacity - 1, 0, -1))
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: VersionKey) -> bool:
        return key in self._slot_of

    @property
    def nbytes(self) -> int:
        ts = [self._head_w, self._head_b, *self._b.values()]
        ts += [g.a for g in self._groups.values() if g.a is not None]
        return sum(t.nbytes for t in ts)

    # Every method that touches the stacks runs in inference mode: stacks grown during a
    # forward are inference tensors, which may only be written to in inference mode.
    @torch.inference_mode()
    def drop(self, predicate: Callable[[VersionKey], bool]) -> int:
        """Free the slots of every adapter whose key matches; returns how many."""
        with self._lock:
            doomed = [k for k in self._slot_of if predicate(k)]
            for key in doomed:
                slot = self._slot_of.pop(key)
                self._clear(slot)
                self._free.append(slot)
            return len(doomed)

    # -- planning ---------------------------------------------------------------------------

    @torch.inference_mode()
    def plan(self, rows: list[LoadedAdapter | None]) -> BatchPlan:
        with self._lock:
            distinct = {a.key: a for a in rows if a is not None}
            if len(distinct) > self.capacity - 1:
                raise CapacityError(
                    f"batch names {len(distinct)} distinct adapters; the device holds {self.capacity - 1}"
                )
            slot_ids = {key: self._ensure(adapter, distinct) for key, adapter in distinct.items()}
            idx_list = [0 if a is None else slot_ids[a.key] for a in rows]
            single = len(set(idx_list)) == 1 and idx_list[0] != 0
            return self._gather(idx_list, list(distinct.values()), single)

    def _gather(self, idx_list: list[int], adapters: list[LoadedAdapter], single: bool) -> BatchPlan:
        idx = torch.tensor(idx_list, device=self.device)
        s = idx_list[0]
        modules: dict[str, ModulePlan] = {}
        ranks: dict[str, int] = {}  # the batch's widest rank per targeted module
        for adapter in adapters:
            for path, (a_mat, _) in adapter.lora.items():
                if a_mat.shape[0] > ranks.get(path, 0):
                    ranks[path] = a_mat.shape[0]
        for g in self._groups.values():
            active = [p for p in g.paths if p in ranks]
            if not active:
                continue
            # columns this batch needs: each active module's first `rank` columns
            spans = [(g.offset(p), g.offset(p) + ranks[p]) for p in active]
            contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
            assert g.a is not None
            if contiguous:
                c0, c1 = spans[0][0], spans[-1][1]
                # single: a view of the shared stack, cloned below so eviction cannot change it
                # index_select is several times faster than advanced indexing here
                a = g.a[s, :, c0:c1].clone() if single else g.a.index_select(0, idx)[:, :, c0:c1]
            else:
                cols = torch.cat([torch.arange(x, y, device=self.device) for x, y in spans])
                a = g.a[s][:, cols] if single else g.a.index_select(0, idx)[:, :, cols]
            gp = GroupPlan(a=a, single=single)
            start = 0
            for p in active:
                r = ranks[p]
                b = self._b[p]
                modules[p] = ModulePlan(group=gp, start=start, stop=start + r,
                                        b=b[s, :r].clone() if single else b.index_select(0, idx)[:, :r])
                start += r
        n_labels = max(a.n_labels for a in adapters) if adapters else 1
        if single:
            hw, hb = self._head_w[s, :, :n_labels].clone(), self._head_b[s, :n_labels].clone()
        else:
            hw = self._head_w.index_select(0, idx)[:, :, :n_labels]
            hb = self._head_b.index_select(0, idx)[:, :n_labels]
        return BatchPlan(modules=modules, head_weight=hw, head_bias=hb, single=single)

    # -- slot management (lock held) ----------------------------------------------------------

    def _ensure(self, adapter: LoadedAdapter, batch: dict[VersionKey, LoadedAdapter]) -> int:
        slot = self._slot_of.get(adapter.key)
        if slot is not None:
            self._slot_of.move_to_end(adapter.key)
            return slot
        if not self._free:
            victim = next(k for k in self._slot_of if k not in batch)
            self._free.append(self._slot_of.pop(victim))
            self._clear(self._free[-1])
            self.evictions += 1
        slot = self._free.pop()
        self._write(slot, adapter)
        self._slot_of[adapter.key] = slot
        return slot

    def _clear(self, slot: int) -> None:
        for g in self._groups.values():
            if g.a is not None:
                g.a[slot].zero_()
        for b in self._b.values():
            b[slot].zero_()
        self._head_w[slot].zero_()
        self._head_b[slot].zero_()
        self._holder.pop(slot, None)

    def _write(self, slot: int, adapter: LoadedAdapter) -> None:
        for path, (a, b) in adapter.lora.items():
            g = self._groups[self._group_of[path]]
            r = a.shape[0]
            self._grow_rank(g, path, r)
            off = g.offset(path)
            g.a[slot, :, off : off + r].copy_(a.t())  # type: ignore[index]
            self._b[path][slot, :r].copy_(b.t()).mul_(adapter.scale)
        n = adapter.n_labels
        if n > self._head_w.shape[2]:
            self._head_w = _pad_dim(self._head_w, 2, n)
            self._head_b = _pad_dim(self._head_b, 1, n)
        self._head_w[slot, :, :n].copy_(adapter.head_weight.t())
        self._head_b[slot, :n].copy_(adapter.head_bias)
        self._holder[slot] = adapter

    def _grow_rank(self, g: _Group, path: str, r: int) -> None:
        old_cap = g.rank_cap.get(path, 0)
        if r <= old_cap:
            return
        new_cap = max(r, 2 * old_cap)
        d_out = self.shapes[path][1]
        old_b = self._b.get(path)
        new_b = torch.zeros(self.capacity, new_cap, d_out, device=self.device, dtype=self.dtype)
        if old_b is not None:
            new_b[:, :old_cap].copy_(old_b)
        self._b[path] = new_b
        old_offsets = {p: g.offset(p) for p in g.paths if g.rank_cap.get(p, 0) > 0}
        old_caps = dict(g.rank_cap)
        old_a = g.a
        g.rank_cap[path] = new_cap
        new_a = torch.zeros(self.capacity, g.d_in, g.width, device=self.device, dtype=self.dtype)
        if old_a is not None:
            for p, off in old_offsets.items():
                new_off = g.offset(p)
                new_a[:, :, new_off : new_off + old_caps[p]].copy_(old_a[:, :, off : off + old_caps[p]])
        g.a = new_a


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, device=t.device, dtype=t.dtype)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out
