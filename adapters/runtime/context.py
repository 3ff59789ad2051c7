"""The routing of one forward pass, visible to the wrapped layers while it runs.

A ``BatchPlan`` holds, for one batch, the adapter weights each row needs, already gathered
from the device slots (so the forward never touches the shared stacks and a concurrent slot
change cannot tear it). The engine installs a plan with ``use_plan`` for the duration of one
forward call; the plan lives in a ``ContextVar``, so two threads running forwards at once
each see their own plan. Outside a plan the wrapped layers are exactly the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from adapters.pooling import Pooling


@dataclass
class GroupPlan:
    """Stacked LoRA ``A`` of sibling modules that read the same input (e.g. query/key/value).

    The first sibling to run computes ``x @ A`` for all of them at once (one wider matmul
    instead of several narrow ones); the others reuse it when they see the same input tensor.
    ``keep_out`` (a plan that one thread reuses across forwards: the generation rows' decode
    steps) writes a one-token-per-row ``x @ A`` into a buffer kept with the plan, so a decode
    step allocates nothing there and each module's columns are a view taken once
    (``ModulePlan.columns``); other shapes allocate as usual.
    """

    a: torch.Tensor  # [B, d_in, C], or [d_in, C] when every row uses one adapter
    single: bool
    keep_out: bool = False
    _x: torch.Tensor | None = None
    _xa: torch.Tensor | None = None
    _out: torch.Tensor | None = None  # [B, 1, C] when keep_out, after the first one-token forward

    def down(self, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x:
            if self.single:
                xa = x.reshape(-1, x.shape[-1]) @ self.a
            elif self.keep_out and x.dim() == 3 and x.shape[1] == 1:
                xa = self._out
                if xa is None or xa.shape[0] != x.shape[0] or xa.dtype != x.dtype:
                    xa = self._out = x.new_empty(x.shape[0], 1, self.a.shape[-1])
                torch.bmm(x, self.a, out=xa)
            else:
                xa = torch.bmm(x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1]), self.a)
            self._x, self._xa = x, xa
        return self._xa  # type: ignore[return-value]


@dataclass
class ModulePlan:
    group: GroupPlan
    start: int  # this module's columns in the group's ``x @ A``
    stop: int
    b: torch.Tensor  # [B, r, d_out] (scale folded in), or [r, d_out] when single
    _cols_of: torch.Tensor | None = None  # the group's kept buffer the view below was taken of
    _cols: torch.Tensor | None = None

    def columns(self, xa: torch.Tensor) -> torch.Tensor:
        """This module's columns of the group's ``x @ A`` (the whole of it when it owns them all);
        a view of the group's kept buffer is taken once."""
        if not self.start and self.stop == xa.shape[-1]:
            return xa
        if xa is self._cols_of:
            return self._cols  # type: ignore[return-value]
        cols = xa[..., self.start : self.stop]
        if xa is self.group._out:
            self._cols_of, self._cols = xa, cols
        return cols


@dataclass
class BatchPlan:
    modules: dict[str, ModulePlan]
    head_weight: torch.Tensor  # [B, H, L] or [H, L] when single
    head_bias: torch.Tensor  # [B, L] or [L]
    single: bool
    features: torch.Tensor | None = field(default=None)  # pooled features, set by the head
    # each row's pooling, or None when every row reads the model's own pooled output
    poolings: tuple[Pooling, ...] | None = None
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # (last hidden state, mask) when needed
    layers_mean: torch.Tensor | None = None  # the blocks' outputs' mean, when a row pools all layers


_current: ContextVar[BatchPlan | None] = ContextVar("tailor_batch_plan", default=None)


def current_plan() -> BatchPlan | None:
    return _current.get()


@contextmanager
def use_plan(plan: BatchPlan) -> Iterator[BatchPlan]:
    token = _current.set(plan)
    try:
        yield plan
    finally:
        _current.reset(token)
