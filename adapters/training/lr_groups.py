"""Learning-rate groups for a LoRA run: the new head and LoRA's B matrices may learn faster.

Contract: ``lora_groups(named, head_name, head_scale=, b_scale=)`` splits a peft model's
trainable ``(name, parameter)`` pairs into ``ParamGroup``s:

* the head (any name with the component ``head_name``, e.g. peft's
  ``classifier.modules_to_save.default.weight``) at ``head_scale``;
* LoRA's B matrices (``lora_B`` in the name; LoRA+, Hayou et al. 2024: B at a larger rate
  than A) at ``b_scale``;
* everything else (LoRA's A matrices) at 1.

Groups come in that fixed order (head, B, rest), parameters in ``named`` order inside each,
every parameter exactly once; an empty group is left out. When both scales are 1 the answer is
one group at 1 (what a run without groups had, so its checkpoints stay the same). A scale that
is not a positive finite number is a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from adapters.training.task_hooks import ParamGroup


def lora_groups(named: Sequence[tuple[str, nn.Parameter]], head_name: str, *, head_scale: float = 1.0,
                b_scale: float = 1.0) -> list[ParamGroup]:
    for what, value in (("head_scale", head_scale), ("b_scale", b_scale)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    if head_scale == 1.0 and b_scale == 1.0:
        return [ParamGroup(list(named))]
    head: list[tuple[str, nn.Parameter]] = []
    b: list[tuple[str, nn.Parameter]] = []
    rest: list[tuple[str, nn.Parameter]] = []
    for n, p in named:
        parts = n.split(".")
        (head if head_name in parts else b if "lora_B" in parts else rest).append((n, p))
    groups = [(head, head_scale), (b, b_scale), (rest, 1.0)]
    return [ParamGroup(params, float(scale)) for params, scale in groups if params]
