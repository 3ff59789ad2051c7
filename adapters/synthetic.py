"""Random but well-formed adapters for tests and benchmarks (never for serving real traffic).

``random_artifact(spec)`` fits any base: its task is the base's (``spec.task``); for a vision
base target its pointwise convs by name (``random_image_artifact`` picks them), each a LoRA
``A [r, C_in]``, ``B [C_out, r]`` as the artifact format stores it.
"""

from __future__ import annotations

import torch

from adapters.artifact import AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings
from adapters.fingerprint import BaseSpec
from adapters.tasks import manifest_value

IMAGE_TARGETS = ("_expand_conv", "_project_conv", "_conv_head")  # EfficientNet's pointwise convs


def random_lora(spec: BaseSpec, targets: tuple[str, ...], *, r: int, std: float,
                generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Non-zero LoRA ``(A [r, d_in], B [d_out, r])`` for every layer of ``spec`` each target
    matches, drawn from ``generator`` in target order; a target that matches none is a ValueError."""
    lora = {}
    for target in targets:
        paths = spec.match_target(target)
        if not paths:
            raise ValueError(f"target {target!r} matches no linear layer of the base")
        for path in paths:
            d_in, d_out = spec.linear_shapes[path]
            lora[path] = (torch.randn(r, d_in, generator=generator) * std,
                          torch.randn(d_out, r, generator=generator) * std)
    return lora


def random_artifact(
    spec: BaseSpec, *, r: int = 8, targets: tuple[str, ...] = ("query", "value"), n_labels: int = 2,
    seed: int = 0, alpha: float | None = None, use_rslora: bool = False, std: float = 0.05,
) -> AdapterArtifact:
    """An adapter with non-zero A and B (so it really changes outputs) for ``spec``'s base."""
    g = torch.Generator().manual_seed(seed)
    lora = random_lora(spec, targets, r=r, std=std, generator=g)
    h = spec.head_in_features
    weights = AdapterWeights(
        lora=lora, head_weight=torch.randn(n_labels, h, generator=g) * 0.2,
        head_bias=torch.randn(n_labels, generator=g) * 0.1,
    )
    manifest = AdapterManifest(
        base_fingerprint=spec.fingerprint, labels=tuple(f"label_{i}" for i in range(n_labels)),
        lora=LoraSettings(r=r, alpha=float(alpha if alpha is not None else 2 * r),
                          target_modules=tuple(targets), use_rslora=use_rslora),
        head_in_features=h, source="synthetic", task=manifest_value(spec.task),
    )
    return AdapterArtifact(manifest=manifest, weights=weights)


def random_image_artifact(
    spec: BaseSpec, *, r: int = 4, targets: tuple[str, ...] = IMAGE_TARGETS, n_labels: int = 3,
    seed: int = 0, alpha: float | None = None, std: float = 0.1,
) -> AdapterArtifact:
    """``random_artifact`` for a vision base (``adapters.vision.backbone``): LoRA on its 1x1 convs."""
    return random_artifact(spec, r=r, targets=targets, n_labels=n_labels, seed=seed, alpha=alpha, std=std)
