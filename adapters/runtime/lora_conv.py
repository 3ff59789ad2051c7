"""A frozen pointwise (1x1) convolution that adds each row's own LoRA delta.

``MultiLoraConv1x1`` is the convolution twin of ``MultiLoraLinear``: it wraps one plain 1x1
``nn.Conv2d`` of the base model (stride 1, no padding, groups 1), once, at engine start. A 1x1
convolution is a linear map applied to every pixel, so an adapter for it is a linear LoRA
``A [r, in_channels]``, ``B [out_channels, r]`` (peft's conv ``lora_A``/``lora_B`` weights with
their 1x1 kernel dimensions dropped), and the device ``SlotBank`` holds it as it holds a linear
layer's, under the conv's path with shape ``(in_channels, out_channels)``.

Without a batch plan (or when no adapter in the batch targets this conv) it is the base conv,
bit for bit. With one it computes ``y = conv(x)`` and then, for all rows at once (batched
matmuls over the per-row gathered ``A``/``B`` of the plan's ``ModulePlan``, no loop over
adapters), adds ``(x[b, :, p] @ A[b]) @ B[b]`` at every pixel ``p`` of image ``b`` (the scale is
folded into ``B``). It works channels-first on ``x.view(B, C, H*W)``: ``y += B^T (A^T x)`` in
place, the arithmetic of ``x @ A @ B`` over ``[B, H*W, C]`` without transposing activations.
Rows of the base model point at the all-zero slot 0 and are unchanged.

Pointwise convs do not share the group's cached ``x @ A`` (``GroupPlan.down``): in a mobile
block no two of them read the same tensor; each reads its own columns of the group's ``A``.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.runtime.context import ModulePlan, current_plan


class MultiLoraConv1x1(nn.Module):
    def __init__(self, base_layer: nn.Conv2d, path: str) -> None:
        super().__init__()
        if not is_plain_pointwise(base_layer):
            raise TypeError(f"{path} is not a plain 1x1 nn.Conv2d with stride 1, no padding and groups 1")
        self.base_layer = base_layer
        self.path = path
        self.in_channels = base_layer.in_channels
        self.out_channels = base_layer.out_channels

    @property
    def weight(self) -> torch.Tensor:  # for code that reads a conv's weight (device, dtype, shape)
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        plan = current_plan()
        mp = None if plan is None else plan.modules.get(self.path)
        if mp is not None:  # some row's adapter targets this conv
            self._add_delta(x, y, mp, plan.single)  # type: ignore[union-attr]
        return y

    def _add_delta(self, x: torch.Tensor, y: torch.Tensor, mp: ModulePlan, single: bool) -> None:
        n = x.shape[0]
        at = mp.group.a[..., mp.start : mp.stop].transpose(-1, -2)  # [B, r, C_in] or [r, C_in]
        bt = mp.b.transpose(-1, -2)  # [B, C_out, r] or [C_out, r] (scale folded in)
        if single:  # one adapter for every row: the same A, B for each image
            at, bt = at.expand(n, -1, -1), bt.expand(n, -1, -1)
        xa = torch.bmm(at, x.reshape(n, self.in_channels, -1))  # [B, r, HW]; x is a view if NCHW
        if y.is_contiguous():
            y.view(n, self.out_channels, -1).baddbmm_(bt, xa)
        else:  # e.g. channels-last activations: add through the 4-d shape, whatever the layout
            y.add_(torch.bmm(bt, xa).view(y.shape))


def is_plain_pointwise(layer: nn.Module) -> bool:
    """An exact ``nn.Conv2d`` (no subclass with its own padding) computing a per-pixel linear map."""
    return (type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1)


def wrap_convs(model: nn.Module, paths: list[str]) -> dict[str, MultiLoraConv1x1]:
    """Replace each plain 1x1 ``nn.Conv2d`` at ``paths`` by a ``MultiLoraConv1x1`` (idempotent).

    Raises ``TypeError`` for anything else at a path (a depthwise or 3x3 conv, or a 1x1 conv
    not yet re-classed to ``nn.Conv2d``: see ``adapters.vision.backbone.reclass_pointwise``)."""
    wrapped: dict[str, MultiLoraConv1x1] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, child)
        if not isinstance(layer, MultiLoraConv1x1):
            layer = MultiLoraConv1x1(layer, path)
            setattr(parent, child, layer)
        wrapped[path] = layer
    return wrapped
