"""ONNX Runtime behind the image task's seam: ``OnnxImageServing``, the twin of ``OnnxTextServing``.

Contract: wraps a prepared ``ImageServing`` (decoding, limits, checks, collation and probes are
its own); ``run`` binds the collated ``pixels`` and the plan's gathered 1x1-conv LoRA tensors
(``GraphLayout.feeds``) to ``adapters.runtime.onnx.export_image``'s graph through IOBinding (no
copies), lets it write the pooled features into a torch tensor, and applies the per-row heads
in torch with the very ``MixedHead`` the torch path uses (fp32). Thread-safe like a session.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapters.runtime.context import BatchPlan
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.onnx.export_image import INPUT, OUTPUT
from adapters.runtime.onnx.layout import GraphLayout
from adapters.runtime.onnx.serving import bind_input, bind_output, check_layout, make_session


class OnnxImageServing:
    runtime = "onnx"

    def __init__(self, torch_serving: Any, graph: bytes, *, precision: str = "fp32",
                 threads: int | None = None) -> None:
        self.torch_serving = torch_serving
        self.base = torch_serving.base
        self.spec = torch_serving.spec
        self.precision = precision
        self.layout = GraphLayout.of(self.spec)
        self.session = make_session(graph, threads)
        check_layout(self.session, self.layout, 1)
        self.head = getattr(self.base.model, self.base.head_name)

    @property
    def label(self) -> str:
        return f"onnx-{self.precision}"

    def decode(self, raw: Sequence[Any], *, param: str = "images", limits: Any = None) -> list[torch.Tensor]:
        return self.torch_serving.decode(raw, param=param, limits=limits)

    def check_row(self, row: Any, param: str) -> None:
        self.torch_serving.check_row(row, param)

    def collate(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.torch_serving.collate(rows)

    def size(self, batch: torch.Tensor) -> int:
        return self.torch_serving.size(batch)

    def probe_rows(self) -> list[torch.Tensor]:
        return self.torch_serving.probe_rows()

    def encode(self, pixels: torch.Tensor, lora: list[torch.Tensor]) -> torch.Tensor:
        """The graph alone: pooled features ``[B, F]``."""
        pixels = pixels.float().contiguous()
        pooled = torch.empty(int(pixels.shape[0]), self.base.feature_dim, dtype=torch.float32)
        io = self.session.io_binding()
        bind_input(io, INPUT, pixels)
        for name, v in zip(self.layout.input_names, lora):
            bind_input(io, name, v)
        bind_output(io, OUTPUT, pooled)
        self.session.run_with_iobinding(io)
        return pooled

    def run(self, batch: torch.Tensor, plan: BatchPlan, adapters: Sequence[LoadedAdapter | None]) -> torch.Tensor:
        pooled = self.encode(batch, self.layout.feeds(plan, self.size(batch)))
        return self.head(pooled)  # MixedHead, reading the plan the engine installed
