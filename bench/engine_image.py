"""The image workload of ``bench.engine`` (``--task image``): EfficientNet-Lite0 tenants.

Adapters are what image training makes (``adapters.training.image_task``): LoRA r=8 (alpha 16)
on the auto targets (27 of the 32 pointwise convolutions) and a 10-class head; random, small
weights (``adapters.synthetic``). Rows are random images already decoded and preprocessed
(``[3, S, S]``): ``tailor`` is ``Engine.predict_rows`` on them (collation, one mixed forward
pass, labels), ``base`` the backbone with one ``nn.Linear`` head, peft the same backbone with
each adapter loaded from our peft export (Conv2d LoRA, the head as ``modules_to_save``).

Full: 224 px (the base's own size), 5 rounds, 2,000 registered adapters for the cold loads (an
image adapter is ~0.75 MB: 10,000 would write 7.5 GB), 400 resident for the memory figure.
``--quick``: the same weights built for 96 px inputs (``load_vision_base(input_size=96)``:
the same paddings, ~1/5 of the arithmetic), 5 rounds, 200 registered, 100 resident; the JSON
says so. LoRA's share of the arithmetic is the same at every size (both scale with the pixels).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from adapters.synthetic import random_image_artifact
from adapters.training.image_task import auto_targets
from adapters.vision.backbone import VisionBase, load_vision_base
from bench.engine import Workload

N_LABELS = 10
RANK = 8
QUICK_SIZE = 96
ADAPTER_STD = 0.02  # LoRA factors' scale: deltas of the size training gives, finite through 27 convs


def image_workload(*, quick: bool, base: VisionBase | None = None) -> Workload:
    """``base``: a vision base to use instead of loading EfficientNet-Lite0 (tests: a tiny one)."""
    base = base or load_vision_base(input_size=QUICK_SIZE if quick else None)
    size, device = base.input_size, base.device
    targets = auto_targets(base)  # what an image job adapts by default
    pristine = copy.deepcopy(base.model)  # before the engine wraps base.model
    head = nn.Linear(base.feature_dim, N_LABELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nn.init.normal_(head.weight, std=0.05)
    setattr(pristine, base.head_name, head.to(device=device, dtype=base.dtype))
    gen = torch.Generator().manual_seed(0)

    def inputs(n: int) -> torch.Tensor:
        return (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(device=device, dtype=base.dtype)

    extra = lora_macs_fraction(pristine, targets, RANK, inputs(1))
    return Workload(
        title=f"Mixed tenants ({base.spec.name}, r={RANK} on {len(targets)} 1x1 convs, {size} px)",
        base=base, pristine=pristine,
        artifact=lambda seed: random_image_artifact(base.spec, r=RANK, targets=targets, n_labels=N_LABELS, seed=seed,
                                                    std=ADAPTER_STD),
        inputs=inputs, call=lambda model, batch, **kw: model(batch, **kw), row=lambda batch, i: batch[i : i + 1],
        tailor=lambda engine, batch, rows: engine.predict_rows(list(batch), rows),
        describe={"image_size": size, "rank": RANK, "alpha": 2 * RANK, "labels": N_LABELS,
                  "targets": f"{len(targets)} of {len(base.lora_paths)} pointwise convs (image_task.auto_targets)",
                  "inputs": "decoded, preprocessed images; tailor: Engine.predict_rows"},
        rounds=5, n_registered=200 if quick else 2_000, n_memory=100 if quick else 400,
        notes={"base": base.spec.name, "image_size": size,
               "lora_macs": {"fraction_of_base": extra, "ratio_vs_base_if_as_fast_per_mac": 1 / (1 + extra),
                             "what": "multiply-adds the LoRA deltas add to the backbone's convolutions"},
               "quick_note": f"--quick: {QUICK_SIZE} px (the base's own is 224), 200 registered adapters, 100 resident"
               if quick else None},
    )


@torch.inference_mode()
def lora_macs_fraction(model: nn.Module, targets: tuple[str, ...], r: int, x: torch.Tensor) -> float:
    """Multiply-adds of rank-``r`` deltas on ``targets`` (``r * (C_in + C_out)`` per pixel each)
    over those of every convolution of ``model``, for input ``x``."""
    base_macs, lora_macs = 0, 0
    hooks = []

    def count(module: nn.Module, args: tuple, out: torch.Tensor, path: str) -> None:
        nonlocal base_macs, lora_macs
        kernel = module.kernel_size[0] * module.kernel_size[1]
        base_macs += out.numel() * kernel * module.in_channels // module.groups
        if path in targets:
            lora_macs += r * (module.in_channels + module.out_channels) * out.shape[-2] * out.shape[-1] * out.shape[0]

    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d):  # the package's padded convs are nn.Conv2d subclasses
            hooks.append(m.register_forward_hook(lambda mod, a, o, path=path: count(mod, a, o, path)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return lora_macs / base_macs
