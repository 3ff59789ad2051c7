"""A frozen linear layer that adds each row's own LoRA delta.

``MultiLoraLinear`` wraps one ``nn.Linear`` of the base model, once, at engine start. Without
a batch plan (or when no adapter in the batch targets this layer) it is the base layer. With
one it computes ``y = base(x)`` and then, for all rows at once, ``y += (x @ A[row]) @ B[row]``
in place, where ``A``/``B`` were gathered per row from the device slots (BGMV-style batched
matmul, no loop over adapters). Rows of the base model point at an all-zero slot.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.runtime.context import current_plan


class MultiLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its linears
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        plan = current_plan()
        if plan is None:
            return y
        mp = plan.modules.get(self.path)
        if mp is None:
            return y
        xa = mp.columns(mp.group.down(x))  # a group's module reads its own columns
        if plan.single:
            y.view(-1, self.out_features).addmm_(xa, mp.b)
        elif y.dim() == 3:  # [rows, tokens, d_out] already (the decoders' shape): no view
            y.baddbmm_(xa, mp.b)
        else:
            y.view(y.shape[0], -1, self.out_features).baddbmm_(xa, mp.b)
        return y


def wrap_linears(model: nn.Module, paths: list[str]) -> dict[str, MultiLoraLinear]:
    """Replace each ``nn.Linear`` at ``paths`` by a ``MultiLoraLinear`` (idempotent)."""
    wrapped: dict[str, MultiLoraLinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, child)
        if isinstance(layer, MultiLoraLinear):
            wrapped[path] = layer
            continue
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{path} is a {type(layer).__name__}, not nn.Linear")
        wrapped[path] = MultiLoraLinear(layer, path)
        setattr(parent, child, wrapped[path])
    return wrapped
