"""ONNX Runtime behind the image task's seam: ``OnnxImageServing``, the twin of ``OnnxTextServing``.

Contract: wraps a prepared ``ImageServing`` (decoding, limits, checks, collation and probes are
its own: ``OnnxServingBase``); ``run`` picks the graph for the plan's adapted convs (a target-set
variant once built, see ``adapters.runtime.onnx.variants``), binds the collated ``pixels`` and
the plan's gathered 1x1-conv LoRA tensors (``GraphLayout.feeds``) to
``adapters.runtime.onnx.export_image``'s graph through IOBinding (no copies), lets it write the pooled features into a torch tensor, and applies the per-row heads
in torch with the very ``MixedHead`` the torch path uses (fp32). Thread-safe like a session.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapters.runtime.context import BatchPlan
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.onnx.export_image import INPUT, OUTPUT
from adapters.runtime.onnx.serving import OnnxServingBase, bind_input, bind_output
from adapters.runtime.onnx.variants import Variant


class OnnxImageServing(OnnxServingBase):
    def encode(self, pixels: torch.Tensor, lora: list[torch.Tensor], variant: Variant | None = None) -> torch.Tensor:
        """One graph alone (``variant``; default: the first graph): pooled features ``[B, F]``."""
        variant = variant or self.graphs.first
        pixels = pixels.float().contiguous()
        pooled = torch.empty(int(pixels.shape[0]), self.base.feature_dim, dtype=torch.float32)
        io = variant.session.io_binding()
        bind_input(io, INPUT, pixels)
        for name, v in zip(variant.layout.input_names, lora):
            bind_input(io, name, v)
        bind_output(io, OUTPUT, pooled)
        variant.session.run_with_iobinding(io)
        return pooled

    def run(self, batch: torch.Tensor, plan: BatchPlan, adapters: Sequence[LoadedAdapter | None]) -> torch.Tensor:
        variant = self.variant(plan)
        pooled = self.encode(batch, variant.layout.feeds(plan, self.size(batch)), variant)
        return self.head(pooled)  # MixedHead, reading the plan the engine installed
