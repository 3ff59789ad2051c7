"""The LoRA inputs of an exported graph, and how one batch plan fills them.

Contract:

* ``GraphLayout.of(spec, targets)`` is fixed by the base's spec (so by its fingerprint) and a
  target set: ``targets=None`` puts every linear layer an adapter may target in the graph (the
  universal graph); a set of module paths puts only those (a variant: every other layer is the
  plain base layer, with no LoRA branch at all). Layers are grouped like the device slots group
  them (siblings under one parent with the same input width share one down-projection). Per
  group one input ``lora_a.<group>`` ``[Ba, d_in, C]``; per module one input
  ``lora_b.<module>`` ``[Ba, r, d_out]`` (the adapter scale folded in). Inside the graph a
  module reads columns ``[sum of the ranks of the group's earlier modules, + r)`` of
  ``x @ A``: the ranks come from the ``B`` shapes, so one graph serves any ranks.
* ``Ba`` is the batch size, or 1 for a plan whose rows all use one adapter (``MatMul``
  broadcasts it: no copy per row). A module no adapter of the batch targets gets ``r = 0``;
  a group none targets gets ``C = 0``: both add exactly zero (base rows are zero rows), but
  their matmuls and adds still run -- which is what a variant for the batch's set avoids.
  ``covers(needed)``: whether this layout has a branch for every module of a plan.
* ``feeds(plan, rows)`` returns the tensors in ``input_names`` order, without copying when the
  plan's group already has the graph's column order (the usual case: the slots use the same
  grouping); otherwise the group's columns are concatenated in the graph's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.fingerprint import BaseSpec
from adapters.runtime.context import BatchPlan
from adapters.runtime.slots import sibling_groups

A_PREFIX = "lora_a."
B_PREFIX = "lora_b."


@dataclass(frozen=True)
class LoraGroup:
    name: str  # the parent path (or the module's own path when its siblings differ in width)
    d_in: int
    modules: tuple[str, ...]  # in column order


@dataclass(frozen=True)
class GraphLayout:
    groups: tuple[LoraGroup, ...]
    shapes: dict[str, tuple[int, int]]
    targets: frozenset[str] | None = None  # None: every adaptable layer (the universal graph)

    @classmethod
    def of(cls, spec: BaseSpec, targets: frozenset[str] | None = None) -> GraphLayout:
        """The grouping ``adapters.runtime.slots.SlotBank`` uses, computed from the spec (the
        same group names whatever ``targets`` keeps); a path of ``targets`` that is not a
        linear layer of the base is a ValueError."""
        if targets is not None and not targets <= spec.linear_shapes.keys():
            raise ValueError(f"not adaptable layers of this base: {sorted(targets - spec.linear_shapes.keys())[:3]}")
        groups = sibling_groups(spec.linear_shapes)
        kept = ((g, d, tuple(p for p in m if targets is None or p in targets)) for g, (d, m) in groups.items())
        return cls(groups=tuple(LoraGroup(name=g, d_in=d, modules=m) for g, d, m in kept if m),
                   shapes=dict(spec.linear_shapes), targets=None if targets is None else frozenset(targets))

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(m for g in self.groups for m in g.modules)

    def covers(self, needed: frozenset[str]) -> bool:
        return self.targets is None or needed <= self.targets

    @property
    def input_names(self) -> list[str]:
        names = [A_PREFIX + g.name for g in self.groups]
        return names + [B_PREFIX + m for g in self.groups for m in g.modules]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for g in self.groups:
            axes[A_PREFIX + g.name] = {0: "lora_batch", 2: f"cols_{len(axes)}"}
            for m in g.modules:
                axes[B_PREFIX + m] = {0: "lora_batch", 1: f"rank_{len(axes)}"}
        return axes

    def sample(self, batch: int, rank: int = 2, seed: int = 0) -> list[torch.Tensor]:
        """Random LoRA inputs for tracing (every module active, ``rank`` columns each)."""
        g = torch.Generator().manual_seed(seed)
        a = [torch.randn(batch, grp.d_in, rank * len(grp.modules), generator=g) * 0.05 for grp in self.groups]
        b = [torch.randn(batch, rank, self.shapes[m][1], generator=g) * 0.05
             for grp in self.groups for m in grp.modules]
        return a + b

    def feeds(self, plan: BatchPlan, n_rows: int) -> list[torch.Tensor]:
        """The LoRA inputs for ``plan`` (a ``SlotBank.plan`` of ``n_rows`` rows), in
        ``input_names`` order; contiguous fp32 CPU tensors, copied only where needed."""
        lead = 1 if plan.single else n_rows
        a_feeds: list[torch.Tensor] = []
        b_feeds: list[torch.Tensor] = []
        for grp in self.groups:
            active = [(m, plan.modules[m]) for m in grp.modules if m in plan.modules]
            if not active:
                a_feeds.append(torch.zeros(lead, grp.d_in, 0))
            else:
                gp = active[0][1].group
                width = _width(gp.a)
                same = all(mp.group is gp for _, mp in active)
                pos, in_order = 0, True
                for _, mp in active:
                    in_order = in_order and mp.start == pos
                    pos = mp.stop
                if same and in_order and pos == width:
                    a = gp.a
                else:  # columns of several plan groups, or extra columns: gather in the graph's order
                    a = torch.cat([mp.group.a[..., mp.start:mp.stop] for _, mp in active], dim=-1)
                a_feeds.append(_lead(a, plan.single))
            for m in grp.modules:
                mp = plan.modules.get(m)
                if mp is None:
                    b_feeds.append(torch.zeros(lead, 0, self.shapes[m][1]))
                else:
                    b_feeds.append(_lead(mp.b, plan.single))
        return [_ready(t) for t in a_feeds + b_feeds]


def _width(a: torch.Tensor) -> int:
    return int(a.shape[-1])


def _lead(t: torch.Tensor, single: bool) -> torch.Tensor:
    return t.unsqueeze(0) if single else t


def _ready(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()
