"""ONNX Runtime behind the task seam: ``OnnxTextServing`` is a ``TaskServing`` whose ``run``
calls an exported graph instead of the torch model.

Contract:

* ``OnnxTextServing(torch_serving, graph)`` wraps a prepared ``TextServing``: decoding, row
  checks, collation and probes are the torch serving's own (same tokenizer, same limits);
  only ``run`` differs. ``graph`` is the bytes of ``adapters.runtime.onnx.export``'s graph
  (fp32 or int8, same inputs and outputs).
* ``run(batch, plan, adapters)`` picks the graph for the plan's adapted layers
  (``GraphVariants.pick``: the variant of exactly that target set once built, the universal
  graph until then), feeds it the token tensors and the plan's gathered LoRA tensors
  (that graph's ``GraphLayout.feeds``) through IOBinding straight from torch's memory, lets the graph write
  ``hidden`` and ``pooled`` into torch tensors allocated here (no copy either way), then pools
  each row its adapter's way and applies the per-row heads in torch, in fp32: the very
  ``MixedHead`` the torch path uses, so heads and pooling cannot drift between runtimes.
* Sessions are thread-safe; each call binds its own inputs. ``threads``: ORT's intra-op
  threads (default: torch's, which the service sets per worker). ``build``/``max_variants``:
  how target-set variants are obtained (``adapters.runtime.onnx.runtime`` passes the cache's).
* ``verify(torch_serving, onnx_serving, slots, adapters)`` runs both on the probe rows, with a mixed
  batch of the given adapters and base rows, and returns the largest absolute logit
  difference: the graph cache refuses a graph that does not match its base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from adapters.runtime.context import BatchPlan, use_plan
from adapters.runtime.head import wants_all_layers
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.onnx.layout import GraphLayout
from adapters.runtime.onnx.variants import MAX_VARIANTS, GraphVariants, Variant, make_session
from adapters.tasks.text_classification import TextServing

__all__ = ["OnnxServingBase", "OnnxTextServing", "bind_input", "bind_output", "make_session", "verify"]


def bind_input(io: ort.IOBinding, name: str, v: torch.Tensor) -> None:
    """Bind a contiguous CPU tensor (int64 or fp32) as an input, in place: ORT reads torch's memory."""
    io.bind_input(name, "cpu", 0, np.int64 if v.dtype == torch.int64 else np.float32, list(v.shape), v.data_ptr())


def bind_output(io: ort.IOBinding, name: str, out: torch.Tensor) -> None:
    """Bind a preallocated fp32 tensor as an output: ORT writes straight into it."""
    io.bind_output(name, "cpu", 0, np.float32, list(out.shape), out.data_ptr())


class OnnxServingBase:
    """What both ONNX servings share: the wrapped torch serving's row handling (decoding,
    checks, collation, probes) and the graphs (``GraphVariants``; ``build`` and
    ``max_variants``: its target-set variants, see ``adapters.runtime.onnx.variants``)."""

    runtime = "onnx"

    def __init__(self, torch_serving: Any, graph: bytes, *, precision: str = "fp32", threads: int | None = None,
                 build: Callable[[frozenset[str]], bytes | None] | None = None,
                 max_variants: int = MAX_VARIANTS) -> None:
        self.torch_serving = torch_serving
        self.base = torch_serving.base
        self.spec = torch_serving.spec
        self.precision = precision
        self.graphs = GraphVariants(self.spec, graph, threads=threads, build=build, max_variants=max_variants)
        self.head = getattr(self.base.model, self.base.head_name)

    @property
    def session(self) -> ort.InferenceSession:
        """The first graph's session (the universal graph's, as the runtime builds it)."""
        return self.graphs.first.session

    @property
    def layout(self) -> GraphLayout:
        return self.graphs.first.layout

    @property
    def label(self) -> str:
        """What runs the forward pass, as the gate records it (``onnx-fp32``, ``onnx-int8``)."""
        return f"onnx-{self.precision}"

    def variant(self, plan: BatchPlan) -> Variant:
        """The graph to run ``plan`` on (exactly its adapted layers when that graph is ready)."""
        return self.graphs.pick(frozenset(plan.modules))

    def decode(self, raw: Sequence[Any], **kw: Any) -> list[Any]:
        return self.torch_serving.decode(raw, **kw)

    def check_row(self, row: Any, param: str) -> None:
        self.torch_serving.check_row(row, param)

    def collate(self, rows: Sequence[Any], adapters: Sequence[LoadedAdapter | None] | None = None) -> Any:
        return self.torch_serving.collate(rows, adapters)

    def size(self, batch: Any) -> int:
        return self.torch_serving.size(batch)

    def probe_rows(self) -> list[Any]:
        return self.torch_serving.probe_rows()


class OnnxTextServing(OnnxServingBase):
    """A text base served through an ONNX graph (see the module docstring)."""

    def __init__(self, torch_serving: TextServing, graph: bytes, **kw: Any) -> None:
        super().__init__(torch_serving, graph, **kw)
        self.token_names = self.graphs.first.inputs
        self.hidden_size = self.spec.head_in_features

    def widths(self, batch: dict[str, torch.Tensor]) -> list[int]:
        return self.torch_serving.widths(batch)

    def take(self, batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        return self.torch_serving.take(batch, rows)

    # -- the forward pass --------------------------------------------------------------------------

    def encode(self, batch: dict[str, torch.Tensor], lora: list[torch.Tensor], variant: Variant | None = None,
               *, tokens_out: bool = True, layers_out: bool = False,
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """One graph alone (``variant``; default: the first graph): (hidden ``[B, T, H]``,
        pooled ``[B, H]``, the blocks' mean ``[B, T, H]``) for tokens and that graph's LoRA
        inputs; ``tokens_out=False`` fetches no hidden states and ``layers_out=False`` no blocks'
        mean (None: no row pools them, so they are not copied out)."""
        variant = variant or self.graphs.first
        ids = batch["input_ids"]
        n, t = int(ids.shape[0]), int(ids.shape[1])
        tokens = []
        for name in self.token_names:
            v = batch.get(name)
            if v is None:  # a tokenizer that gives no token types: all zeros, as the model assumes
                v = torch.zeros_like(ids)
            tokens.append(v.to(torch.int64).contiguous())
        hidden = torch.empty(n, t, self.hidden_size, dtype=torch.float32) if tokens_out else None
        layers_mean = torch.empty(n, t, self.hidden_size, dtype=torch.float32) if layers_out else None
        pooled = torch.empty(n, self.hidden_size, dtype=torch.float32)
        io = variant.session.io_binding()
        for name, v in zip((*self.token_names, *variant.layout.input_names), (*tokens, *lora)):
            bind_input(io, name, v)
        if hidden is not None:
            bind_output(io, "hidden", hidden)
        if layers_mean is not None:
            bind_output(io, "layers_mean", layers_mean)
        bind_output(io, "pooled", pooled)
        variant.session.run_with_iobinding(io)
        return hidden, pooled, layers_mean

    def run(self, batch: dict[str, torch.Tensor], plan: BatchPlan,
            adapters: Sequence[LoadedAdapter | None]) -> torch.Tensor:
        n = self.size(batch)
        variant = self.variant(plan)
        plan.poolings = self.torch_serving._poolings(adapters)
        hidden, pooled, layers_mean = self.encode(
            batch, variant.layout.feeds(plan, n), variant, tokens_out=plan.poolings is not None,
            layers_out=wants_all_layers())
        if hidden is not None:
            plan.tokens, plan.layers_mean = (hidden, batch["attention_mask"]), layers_mean
        return self.head(pooled)  # MixedHead: per-row pooling and heads, reading the installed plan


def verify(torch_serving: Any, onnx_serving: Any, slots: Any, adapters: Sequence[LoadedAdapter]) -> float:
    """Max abs logit difference between the two runtimes (any task's serving and its ONNX twin)
    on the task's probe rows, every row mixed
    (``adapters`` cycled, every third row a base row); ``slots``: a ``SlotBank`` to plan with."""
    texts = torch_serving.probe_rows()
    rows: list[LoadedAdapter | None] = [
        None if (i % 3 == 2 or not adapters) else adapters[i % len(adapters)] for i in range(len(texts))]
    batch = torch_serving.collate(texts)
    worst = 0.0
    with torch.inference_mode():
        for serving in (torch_serving, onnx_serving):
            plan = slots.plan(rows)
            with use_plan(plan):
                logits = serving.run(batch, plan, rows)
            if serving is torch_serving:
                ref = logits.float().clone()
            else:
                worst = float((logits.float() - ref).abs().max())
    return worst
