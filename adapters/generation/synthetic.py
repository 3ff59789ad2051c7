"""Random but well-formed text-generation adapters for tests and benchmarks (never for serving).

``random_generation_artifact(spec)`` is a head-less LoRA adapter (no labels, no head) for a
causal base (``adapters.generation.base.CausalBase.spec``) on the decoder linear layers its
``targets`` name (peft-style suffixes: ``q_proj``, ``down_proj``...), each ``A [r, d_in]``,
``B [d_out, r]`` drawn from a seeded generator with standard deviation ``std``.
"""

from __future__ import annotations

import torch

from adapters.artifact import AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings
from adapters.fingerprint import BaseSpec
from adapters.synthetic import random_lora
from adapters.tasks import TEXT_GENERATION, manifest_value

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_generation_artifact(
    spec: BaseSpec, *, r: int = 8, targets: tuple[str, ...] = ALL_TARGETS, seed: int = 0,
    alpha: float | None = None, std: float = 0.05, use_rslora: bool = False,
) -> AdapterArtifact:
    """A head-less adapter with non-zero A and B (so it really changes the next-token logits)."""
    if spec.task != TEXT_GENERATION:
        raise ValueError(f"a generation adapter needs a {TEXT_GENERATION} base, not {spec.task}")
    g = torch.Generator().manual_seed(seed)
    lora = random_lora(spec, targets, r=r, std=std, generator=g)
    weights = AdapterWeights(lora=lora, head_weight=torch.zeros(0, 0), head_bias=torch.zeros(0))
    manifest = AdapterManifest(
        base_fingerprint=spec.fingerprint, labels=(),
        lora=LoraSettings(r=r, alpha=float(alpha if alpha is not None else 2 * r), target_modules=tuple(targets),
                          use_rslora=use_rslora),
        head_in_features=0, source="synthetic", task=manifest_value(TEXT_GENERATION),
    )
    return AdapterArtifact(manifest=manifest, weights=weights)
