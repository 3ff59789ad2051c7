"""Export a prepared text base to ONNX with every row's LoRA weights as graph inputs.

Contract:

* ``export_text_graph(base, path)`` writes one ONNX graph for ``base`` (an
  ``adapters.base.BaseModel`` already prepared by its ``TextServing``): inputs are the
  tokenizer's tensors (``TOKEN_INPUTS`` the tokenizer gives) followed by ``GraphLayout``'s
  LoRA inputs; outputs are ``hidden`` (the backbone's last hidden state ``[B, T, H]``) and
  ``pooled`` (its pooled output ``[B, H]``, what a ``*ForSequenceClassification`` head reads).
  Pooling and the per-row heads stay in torch after the graph (fp32, tiny). Batch, sequence,
  LoRA batch, rank and column axes are dynamic.
* The export runs on a deep copy of the model (the serving model is never touched) whose
  ``MultiLoraLinear`` layers are replaced by ``_GraphLora`` layers computing
  ``y = base(x) + (x @ A_group)[..., cols] @ B`` from the inputs. The legacy TorchScript
  exporter (``dynamo=False``) is used: it needs no ``onnxscript``.
* Anything that stops the export (an unsupported op, a model without a backbone) raises
  ``ExportError`` naming why; the caller serves on torch instead. The exported graph is
  checked against torch by the caller (``adapters.runtime.onnx.serving.verify``), never here.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.base import BaseModel
from adapters.pooling import backbone
from adapters.runtime.lora_layer import MultiLoraLinear
from adapters.runtime.onnx.layout import GraphLayout

OPSET = 17
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("hidden", "pooled")


class ExportError(RuntimeError):
    """The base does not export to an ONNX graph Tailor can serve (the message says why)."""


class _Feeds:
    """The LoRA tensors of the call being traced, shared by every ``_GraphLora``."""

    def __init__(self, layout: GraphLayout) -> None:
        self.layout = layout
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.group_of = {m: g.name for g in layout.groups for m in g.modules}
        self.modules_of = {g.name: g.modules for g in layout.groups}
        self._down: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, tensors: tuple[torch.Tensor, ...]) -> None:
        names = self.layout.input_names
        n_groups = len(self.layout.groups)
        self.a = {n.partition(".")[2]: t for n, t in zip(names[:n_groups], tensors[:n_groups])}
        self.b = {n.partition(".")[2]: t for n, t in zip(names[n_groups:], tensors[n_groups:])}
        self._down = {}

    def delta(self, path: str, x: torch.Tensor) -> torch.Tensor:
        group = self.group_of[path]
        cached = self._down.get(group)
        if cached is None or cached[0] is not x:  # siblings reading the same input share x @ A
            rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, d_in]; a 2-D input is T = 1
            cached = (x, torch.matmul(rows, self.a[group]))
            self._down[group] = cached
        xa = cached[1]
        start: Any = 0
        for m in self.modules_of[group]:  # columns from the B shapes: traced, so any ranks work
            if m == path:
                break
            start = start + self.b[m].shape[1]
        b = self.b[path]
        return torch.matmul(xa[..., start:start + b.shape[1]], b).reshape(*x.shape[:-1], b.shape[2])


class _GraphLora(nn.Module):
    def __init__(self, base_layer: nn.Linear, path: str, feeds: _Feeds) -> None:
        super().__init__()
        self.base_layer, self.path, self.feeds = base_layer, path, feeds

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.feeds.delta(self.path, x)


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module, feeds: _Feeds, token_names: tuple[str, ...]) -> None:
        super().__init__()
        self.inner, self.feeds, self.token_names = inner, feeds, token_names

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(self.token_names)
        self.feeds.set(args[k:])
        out = self.inner(**dict(zip(self.token_names, args[:k])))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ExportError(f"{type(self.inner).__name__} gives no pooled output for the head")
        return out.last_hidden_state, pooled


def export_text_graph(base: BaseModel, path: Path | None = None, *, opset: int = OPSET) -> bytes:
    """Export ``base`` (see the module docstring); returns the graph's bytes (also written to
    ``path`` when given). Raises ``ExportError``."""
    if base.device.type != "cpu":
        raise ExportError(f"the ONNX export runs on CPU; this base is on {base.device}")
    layout = GraphLayout.of(base.spec)
    model = copy.deepcopy(base.model).float().eval()
    inner = backbone(model)
    if inner is None:
        raise ExportError(f"{type(model).__name__} has no backbone to export")
    feeds = _Feeds(layout)
    for p in base.spec.linear_shapes:
        parent_path, _, child = p.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, child)
        lin = layer.base_layer if isinstance(layer, MultiLoraLinear) else layer
        if not isinstance(lin, nn.Linear):
            raise ExportError(f"{p} is a {type(lin).__name__}, not a linear layer")
        setattr(parent, child, _GraphLora(lin, p, feeds))
    sample_tokens = base.tokenize(["a short text", "and a second, somewhat longer text to pad"])
    token_names = tuple(n for n in TOKEN_INPUTS if n in sample_tokens)
    wrapper = _Wrapper(inner, feeds, token_names).eval()  # export restores the mode it found
    args = tuple(sample_tokens[n] for n in token_names) + tuple(layout.sample(batch=2))
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in token_names}
    axes.update(layout.dynamic_axes())
    axes.update({"hidden": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"}})
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python values are expected
            torch.onnx.export(wrapper, args, buf, dynamo=False, opset_version=opset,
                              input_names=[*token_names, *layout.input_names], output_names=list(OUTPUTS),
                              dynamic_axes=axes, do_constant_folding=True)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - any exporter failure means: serve this base on torch
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
