"""An adapter decoded and laid out for the engine: the unit the resident cache holds.

Weights are stored pre-transposed with the LoRA scale folded into ``B``, in the serving
dtype, so that putting an adapter into a device slot is a plain copy. Immutable once built:
a request that resolved a version keeps using exactly these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.artifact import AdapterArtifact, AdapterManifest


@dataclass(frozen=True)
class VersionKey:
    """Identifies one immutable adapter version; the sha256 guards against reused numbers."""

    tenant: str
    adapter: str
    version: int
    sha256: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.adapter}@{self.version}"


@dataclass(frozen=True)
class LoadedAdapter:
    key: VersionKey
    manifest: AdapterManifest
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (A^T [d_in, r], scale*B^T [r, d_out])
    head_weight: torch.Tensor  # [H, L]
    head_bias: torch.Tensor  # [L]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def nbytes(self) -> int:
        n = self.head_weight.nbytes + self.head_bias.nbytes
        return n + sum(a.nbytes + b.nbytes for a, b in self.lora.values())

    def rank_of(self, path: str) -> int:
        pair = self.lora.get(path)
        return 0 if pair is None else pair[0].shape[1]

    @classmethod
    def from_artifact(cls, key: VersionKey, art: AdapterArtifact, dtype: torch.dtype) -> LoadedAdapter:
        scale = art.manifest.lora.scale
        lora = {
            path: (
                a.to(torch.float32).t().contiguous().to(dtype),
                (b.to(torch.float32) * scale).t().contiguous().to(dtype),
            )
            for path, (a, b) in art.weights.lora.items()
        }
        w = art.weights
        return cls(
            key=key, manifest=art.manifest, lora=lora,
            head_weight=w.head_weight.to(torch.float32).t().contiguous().to(dtype),
            head_bias=w.head_bias.to(dtype).contiguous(),
        )
