"""Per-row classification heads: each adapter brings its own head and its own label set.

``MixedHead`` replaces the base model's classification head. For a batch it computes every
row's logits against that row's adapter head in one batched matmul; heads of different label
counts are zero-padded to the batch's widest and callers slice each row back to its own
labels. It also keeps the pooled features, which is what rows asking for the base model get.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.runtime.context import current_plan


class MixedHead(nn.Module):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        plan = current_plan()
        if plan is None:
            raise RuntimeError("the mixed head runs only inside an engine batch (no plan installed)")
        plan.features = pooled
        if plan.single:
            return torch.addmm(plan.head_bias, pooled, plan.head_weight)
        return torch.baddbmm(plan.head_bias.unsqueeze(1), pooled.unsqueeze(1), plan.head_weight).squeeze(1)
