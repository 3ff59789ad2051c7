"""Per-row classification heads: each adapter brings its own head and its own label set.

``MixedHead`` replaces the base model's classification head. For a batch it computes every
row's logits against that row's adapter head in one batched matmul; heads of different label
counts are zero-padded to the batch's widest and callers slice each row back to its own
labels. It also keeps the pooled features, which is what rows asking for the base model get.

Pooling per row: the head receives the model's own pooled output; where the plan names other
poolings (``plan.poolings``: each row's adapter's, or the base's for a base row), it pools the
token states ``keep_tokens`` kept for this forward (``adapters.pooling.apply_rows``: each kind
present computed once, on its rows), so one forward pass serves adapters of any pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.pooling import apply_rows
from adapters.runtime.context import current_plan


def keep_tokens(hidden: torch.Tensor, mask: torch.Tensor, layers_mean: torch.Tensor | None) -> None:
    """The backbone's hook (``adapters.pooling.tap_tokens``): keep token states if the plan pools them."""
    plan = current_plan()
    if plan is not None and plan.poolings is not None:
        plan.tokens = (hidden, mask)
        plan.layers_mean = layers_mean


def wants_all_layers() -> bool:
    """Whether some row of the current batch pools every layer's token states (the tap's question)."""
    plan = current_plan()
    return plan is not None and plan.poolings is not None and any(p.all_layers for p in plan.poolings)


class MixedHead(nn.Module):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        plan = current_plan()
        if plan is None:
            raise RuntimeError("the mixed head runs only inside an engine batch (no plan installed)")
        if plan.poolings is not None:
            hidden, mask = plan.tokens if plan.tokens is not None else (None, None)
            pooled = apply_rows(plan.poolings, pooled, hidden, mask, plan.layers_mean)
            plan.tokens = plan.layers_mean = None  # the token states are not needed past the head
        plan.features = pooled
        if plan.single:
            return torch.addmm(plan.head_bias, pooled, plan.head_weight)
        return torch.baddbmm(plan.head_bias.unsqueeze(1), pooled.unsqueeze(1), plan.head_weight).squeeze(1)
