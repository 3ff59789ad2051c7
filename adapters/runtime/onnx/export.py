"""Export a prepared text base to ONNX with every row's LoRA weights as graph inputs.

Contract:

* ``export_text_graph(base, path, targets=)`` writes one ONNX graph for ``base`` (an
  ``adapters.base.BaseModel`` already prepared by its ``TextServing``): inputs are the
  tokenizer's tensors (``TOKEN_INPUTS`` the tokenizer gives) followed by the LoRA inputs of
  ``GraphLayout.of(spec, targets)`` (``targets=None``: every adaptable layer; a set of module
  paths: a variant with LoRA branches on those layers only); outputs are ``hidden`` (the backbone's last hidden state ``[B, T, H]``),
  ``pooled`` (its pooled output ``[B, H]``, what a ``*ForSequenceClassification`` head reads)
  and ``layers_mean`` (the mean of its transformer blocks' outputs ``[B, T, H]``, for heads
  pooling every layer: ``adapters.pooling``).
  Pooling and the per-row heads stay in torch after the graph (fp32, tiny). Batch, sequence,
  LoRA batch, rank and column axes are dynamic.
* The export runs on a deep copy of the model (``graph_copy``: the serving model is never
  touched) whose ``MultiLoraLinear`` layers in the layout are replaced by ``_GraphLora`` layers
  computing ``y = base(x) + (x @ A_group)[..., cols] @ B`` from the inputs, and the others by
  their plain base layer (1x1 convs: ``_GraphConvLora``, the same at every pixel; ``adapters.runtime.onnx.export_image`` exports vision bases). The legacy TorchScript
  exporter (``dynamo=False``) is used: it needs no ``onnxscript``.
* Anything that stops the export (an unsupported op, a model without a backbone) raises
  ``ExportError`` naming why; the caller serves on torch instead. The exported graph is
  checked against torch by the caller (``adapters.runtime.onnx.serving.verify``), never here.
* The exporter's NaN guard after each attention softmax (for a row whose mask is all zeros,
  which a tokenised row never is) is removed: ``adapters.runtime.onnx.graph_edit.drop_nan_guards``.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.base import BaseModel
from adapters.pooling import backbone
from adapters.runtime.lora_conv import MultiLoraConv1x1, is_plain_pointwise
from adapters.runtime.lora_layer import MultiLoraLinear
from adapters.runtime.onnx.graph_edit import drop_nan_guards
from adapters.runtime.onnx.layout import GraphLayout

OPSET = 17
# torch.onnx.export keeps its state in globals (GLOBALS.in_onnx_export): one export at a time per
# process, whether at start or in the background (adapters.runtime.onnx.variants)
_EXPORTING = threading.Lock()
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("hidden", "pooled", "layers_mean")


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

    def delta_rows(self, path: str, rows: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``rows [B, N, d_in]`` -> this module's delta ``[B, N, d_out]``. Siblings reading the
        same input (``key``) share one ``x @ A`` of the whole group."""
        group = self.group_of[path]
        cached = self._down.get(group)
        if cached is None or cached[0] is not key:
            cached = (key, torch.matmul(rows, self.a[group]))
            self._down[group] = cached
        xa = cached[1]
        start: Any = 0
        for m in self.modules_of[group]:  # columns from the B shapes: traced, so any ranks work
            if m == path:
                break
            start = start + self.b[m].shape[1]
        b = self.b[path]
        return torch.matmul(xa[..., start:start + b.shape[1]], b)

    def delta(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """A linear layer's delta for ``x [..., d_in]`` (a 2-D input is one row of one token)."""
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.delta_rows(path, rows, x).reshape(*x.shape[:-1], self.b[path].shape[2])


class _GraphBranch(nn.Module):
    """A base layer whose LoRA delta comes from the graph's inputs (``feeds``); reads as the layer."""

    def __init__(self, base_layer: nn.Module, path: str, feeds: _Feeds) -> None:
        super().__init__()
        self.base_layer, self.path, self.feeds = base_layer, path, feeds

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class _GraphLora(_GraphBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.feeds.delta(self.path, x)


class _GraphConvLora(_GraphBranch):
    """A 1x1 convolution's LoRA: the linear delta at every pixel (``x`` as ``[B, H*W, C]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rows = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        return y + self.feeds.delta_rows(self.path, rows, x).transpose(1, 2).reshape(y.shape)


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module, feeds: _Feeds, token_names: tuple[str, ...]) -> None:
        super().__init__()
        self.inner, self.feeds, self.token_names = inner, feeds, token_names

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = len(self.token_names)
        self.feeds.set(args[k:])
        out = self.inner(**dict(zip(self.token_names, args[:k])), output_hidden_states=True)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ExportError(f"{type(self.inner).__name__} gives no pooled output for the head")
        per_block = out.hidden_states[1:]  # the embeddings' output first, then each block's
        layers_mean = sum(per_block[1:], per_block[0]) / len(per_block) if per_block else out.last_hidden_state
        return out.last_hidden_state, pooled, layers_mean


def graph_copy(base: Any, targets: frozenset[str] | None = None) -> tuple[nn.Module, _Feeds, GraphLayout]:
    """A deep copy of ``base.model`` (fp32, eval) whose layers in ``GraphLayout.of(spec, targets)``
    read their LoRA from the returned ``_Feeds`` (linears become ``_GraphLora``, 1x1 convs
    ``_GraphConvLora``) and whose other adaptable layers are their plain base layer."""
    if base.device.type != "cpu":
        raise ExportError(f"the ONNX export runs on CPU; this base is on {base.device}")
    layout = GraphLayout.of(base.spec, targets)
    adapted = layout.modules
    model = copy.deepcopy(base.model).float().eval()
    feeds = _Feeds(layout)
    for p in base.spec.linear_shapes:
        parent_path, _, child = p.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, child)
        inner = layer.base_layer if isinstance(layer, (MultiLoraLinear, MultiLoraConv1x1)) else layer
        if p not in adapted:
            setattr(parent, child, inner)
        elif isinstance(inner, nn.Linear):
            setattr(parent, child, _GraphLora(inner, p, feeds))
        elif is_plain_pointwise(inner):
            setattr(parent, child, _GraphConvLora(inner, p, feeds))
        else:
            raise ExportError(f"{p} is a {type(inner).__name__}, neither a linear layer nor a plain 1x1 conv")
    return model, feeds, layout


def export_module(wrapper: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], axes: dict[str, dict[int, str]], opset: int) -> bytes:
    """``torch.onnx.export`` (legacy exporter) to bytes; any failure is an ``ExportError``."""
    buf = io.BytesIO()
    try:
        with _EXPORTING, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python values are expected
            torch.onnx.export(wrapper.eval(), args, buf, dynamo=False, opset_version=opset,  # export restores the mode
                              input_names=input_names, output_names=output_names, dynamic_axes=axes,
                              do_constant_folding=True)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - any exporter failure means: serve this base on torch
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    return buf.getvalue()


def export_text_graph(base: BaseModel, path: Path | None = None, *, opset: int = OPSET,
                      targets: frozenset[str] | None = None) -> bytes:
    """Export ``base`` (see the module docstring); returns the graph's bytes (also written to
    ``path`` when given). Raises ``ExportError``."""
    model, feeds, layout = graph_copy(base, targets)
    inner = backbone(model)
    if inner is None:
        raise ExportError(f"{type(model).__name__} has no backbone to export")
    sample_tokens = base.tokenize(["a short text", "and a second, somewhat longer text to pad"])
    token_names = tuple(n for n in TOKEN_INPUTS if n in sample_tokens)
    wrapper = _Wrapper(inner, feeds, token_names)
    args = tuple(sample_tokens[n] for n in token_names) + tuple(layout.sample(batch=2))
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in token_names}
    axes.update(layout.dynamic_axes())
    axes.update({"hidden": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"},
                 "layers_mean": {0: "batch", 1: "sequence"}})
    data = drop_nan_guards(export_module(wrapper, args, [*token_names, *layout.input_names], list(OUTPUTS), axes,
                                         opset))
    if path is not None:
        Path(path).write_bytes(data)
    return data
