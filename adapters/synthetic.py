"""Random but well-formed adapters for tests and benchmarks (never for serving real traffic)."""

from __future__ import annotations

import torch

from adapters.artifact import AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings
from adapters.fingerprint import BaseSpec


def random_artifact(
    spec: BaseSpec, *, r: int = 8, targets: tuple[str, ...] = ("query", "value"), n_labels: int = 2,
    seed: int = 0, alpha: float | None = None, use_rslora: bool = False, std: float = 0.05,
) -> AdapterArtifact:
    """An adapter with non-zero A and B (so it really changes outputs) for ``spec``'s base."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for target in targets:
        paths = spec.match_target(target)
        if not paths:
            raise ValueError(f"target {target!r} matches no linear layer of the base")
        for path in paths:
            d_in, d_out = spec.linear_shapes[path]
            lora[path] = (torch.randn(r, d_in, generator=g) * std, torch.randn(d_out, r, generator=g) * std)
    h = spec.head_in_features
    weights = AdapterWeights(
        lora=lora, head_weight=torch.randn(n_labels, h, generator=g) * 0.2,
        head_bias=torch.randn(n_labels, generator=g) * 0.1,
    )
    manifest = AdapterManifest(
        base_fingerprint=spec.fingerprint, labels=tuple(f"label_{i}" for i in range(n_labels)),
        lora=LoraSettings(r=r, alpha=float(alpha if alpha is not None else 2 * r),
                          target_modules=tuple(targets), use_rslora=use_rslora),
        head_in_features=h, source="synthetic",
    )
    return AdapterArtifact(manifest=manifest, weights=weights)
