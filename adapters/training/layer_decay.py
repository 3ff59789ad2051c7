"""Layer-wise learning-rate decay for an EfficientNet-style backbone: lower layers learn slower.

Contract:

* ``block_stages(model)`` -- the stage of each of ``model._blocks`` (0-based). A block starts a
  new stage unless it keeps its input's shape (same input and output channels, stride 1): the
  package builds every repeat of a stage that way, so this recovers the stages of
  ``blocks_args`` (Lite0: 7 stages over 16 blocks).
* ``depth(name, stages)`` -- the depth of a parameter from its name (peft's prefixes and
  LoRA suffixes are fine): the stem (``_conv_stem``, ``_bn0``) 0, a block of stage ``s``
  ``s + 1``, the head conv (``_conv_head``, ``_bn1``) ``n_stages + 1``, the classifier head
  (``_fc``) ``n_stages + 2``, the top. Any other name is a ``ValueError``.
* ``decayed_groups(named, stages, decay)`` -- ``ParamGroup``s by depth, deepest first, each at
  ``decay ** (top - depth)`` (the head at the full rate, the head conv at ``decay``, ...);
  every parameter once, in ``named`` order within a group. ``decay == 1``: one group at 1.
  Per stage, not per block: 16 blocks at 0.8 each would leave the stem at 2% of the rate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from adapters.training.task_hooks import ParamGroup

_BLOCK = re.compile(r"(?:^|\.)_blocks\.(\d+)\.")
_STEM = ("_conv_stem", "_bn0")
_HEAD_CONV = ("_conv_head", "_bn1")
_HEAD = "_fc"


def block_stages(model: nn.Module) -> list[int]:
    stages: list[int] = []
    for block in getattr(model, "_blocks"):
        args = block._block_args
        stride = args.stride if isinstance(args.stride, int) else max(args.stride)
        same_shape = args.input_filters == args.output_filters and stride == 1
        stages.append(stages[-1] if stages and same_shape else len(set(stages)))
    return stages


def depth(name: str, stages: Sequence[int]) -> int:
    n_stages = (max(stages) + 1) if stages else 0
    parts = name.split(".")
    m = _BLOCK.search(name)
    if m:
        return stages[int(m.group(1))] + 1
    if any(p in _STEM for p in parts):
        return 0
    if any(p in _HEAD_CONV for p in parts):
        return n_stages + 1
    if _HEAD in parts:
        return n_stages + 2
    raise ValueError(f"parameter {name!r} is in no layer of an EfficientNet-style backbone")


def decayed_groups(named: Sequence[tuple[str, nn.Parameter]], stages: Sequence[int],
                   decay: float) -> list[ParamGroup]:
    if decay == 1.0:
        return [ParamGroup(list(named))]
    top = ((max(stages) + 1) if stages else 0) + 2
    by_depth: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for n, p in named:
        by_depth.setdefault(depth(n, stages), []).append((n, p))
    return [ParamGroup(by_depth[d], decay ** (top - d)) for d in sorted(by_depth, reverse=True)]
