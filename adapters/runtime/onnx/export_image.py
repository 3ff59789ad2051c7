"""Export a prepared vision base to ONNX with every row's 1x1-conv LoRA weights as graph inputs.

Contract: ``export_image_graph(base, targets=)`` writes one graph for ``base`` (an
``adapters.vision.backbone.VisionBase`` prepared by its ``ImageServing``): input ``pixels``
``[B, 3, S, S]`` (fp32, preprocessed as ``collate`` gives it) followed by ``GraphLayout``'s LoRA
inputs (the pointwise convs in ``GraphLayout.of(spec, targets)``, grouped as the device slots
group them; ``targets=None``: every one); output ``pooled``, the
backbone's pooled features ``[B, F]`` (what the head reads). The head is dropped from the copy
(``nn.Identity``): the per-row heads stay in torch after the graph, as for text. Batch, LoRA
batch, rank and column axes are dynamic; the image size is the base's fixed ``input_size``.
Failures raise ``ExportError`` (the caller serves on torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.runtime.onnx.export import OPSET, ExportError, _Feeds, export_module, graph_copy

INPUT = "pixels"
OUTPUT = "pooled"


class _ImageWrapper(nn.Module):
    def __init__(self, model: nn.Module, feeds: _Feeds) -> None:
        super().__init__()
        self.model, self.feeds = model, feeds

    def forward(self, pixels: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        self.feeds.set(lora)
        return self.model(pixels)


def export_image_graph(base: Any, path: Path | None = None, *, opset: int = OPSET,
                       targets: frozenset[str] | None = None) -> bytes:
    model, feeds, layout = graph_copy(base, targets)
    if not hasattr(model, base.head_name):
        raise ExportError(f"{type(model).__name__} has no head {base.head_name!r} to cut the graph at")
    setattr(model, base.head_name, nn.Identity())
    size = base.input_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    axes: dict[str, dict[int, str]] = {INPUT: {0: "batch"}, **layout.dynamic_axes(), OUTPUT: {0: "batch"}}
    data = export_module(_ImageWrapper(model, feeds), (pixels, *layout.sample(batch=2)),
                         [INPUT, *layout.input_names], [OUTPUT], axes, opset)
    if path is not None:
        Path(path).write_bytes(data)
    return data
