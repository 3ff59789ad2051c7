"""An adapter decoded and laid out for the engine: the unit the resident cache holds.

Weights keep the artifact's (peft's) orientation, in the serving dtype: building one is
nearly free, and the device slots transpose and scale while they copy. Immutable once built:
a request that resolved a version keeps using exactly these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.artifact import AdapterArtifact, AdapterManifest
from adapters.pooling import Pooling
from adapters.runtime.memory import pack


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
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (A [r, d_in], B [d_out, r])
    scale: float
    head_weight: torch.Tensor  # [L, H]
    head_bias: torch.Tensor  # [L]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def pooling(self) -> Pooling:
        return self.manifest.pooling

    @property
    def max_length(self) -> int | None:
        """Tokens per text its rows are cut to (None: the base's ``max_length``)."""
        return self.manifest.max_length

    @property
    def nbytes(self) -> int:
        n = self.head_weight.nbytes + self.head_bias.nbytes
        return n + sum(a.nbytes + b.nbytes for a, b in self.lora.values())

    @property
    def n_labels(self) -> int:
        return self.head_weight.shape[0]

    @classmethod
    def from_artifact(cls, key: VersionKey, art: AdapterArtifact, dtype: torch.dtype) -> LoadedAdapter:
        w = art.weights
        paths = list(w.lora)
        flat = [w.head_weight, w.head_bias] + [t for p in paths for t in w.lora[p]]
        packed = pack(flat, dtype)  # one host allocation per adapter (see runtime.memory)
        lora = {p: (packed[2 + 2 * i], packed[3 + 2 * i]) for i, p in enumerate(paths)}
        return cls(key=key, manifest=art.manifest, lora=lora, scale=art.manifest.lora.scale,
                   head_weight=packed[0], head_bias=packed[1])
