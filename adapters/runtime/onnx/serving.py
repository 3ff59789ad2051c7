"""ONNX Runtime behind the task seam: ``OnnxTextServing`` is a ``TaskServing`` whose ``run``
calls an exported graph instead of the torch model.

Contract:

* ``OnnxTextServing(torch_serving, graph)`` wraps a prepared ``TextServing``: decoding, row
  checks, collation and probes are the torch serving's own (same tokenizer, same limits);
  only ``run`` differs. ``graph`` is the bytes of ``adapters.runtime.onnx.export``'s graph
  (fp32 or int8, same inputs and outputs).
* ``run(batch, plan, adapters)`` feeds the token tensors and the plan's gathered LoRA tensors
  (``GraphLayout.feeds``) through IOBinding straight from torch's memory, lets the graph write
  ``hidden`` and ``pooled`` into torch tensors allocated here (no copy either way), then pools
  each row its adapter's way and applies the per-row heads in torch, in fp32: the very
  ``MixedHead`` the torch path uses, so heads and pooling cannot drift between runtimes.
* Sessions are thread-safe; each call binds its own inputs. ``threads``: ORT's intra-op
  threads (default: torch's, which the service sets per worker).
* ``verify(torch_serving, onnx_serving, slots, adapters)`` runs both on the probe rows, with a mixed
  batch of the given adapters and base rows, and returns the largest absolute logit
  difference: the graph cache refuses a graph that does not match its base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from adapters.runtime.context import BatchPlan, use_plan
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.onnx.layout import GraphLayout
from adapters.tasks.text_classification import TextServing


def make_session(graph: bytes, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between ops: the serving process shares its cores with torch, the event
    # loop and other workers, and a spinning pool stalls them (measured: 2 ms calls became 50 ms)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])


def bind_input(io: ort.IOBinding, name: str, v: torch.Tensor) -> None:
    """Bind a contiguous CPU tensor (int64 or fp32) as an input, in place: ORT reads torch's memory."""
    io.bind_input(name, "cpu", 0, np.int64 if v.dtype == torch.int64 else np.float32, list(v.shape), v.data_ptr())


def bind_output(io: ort.IOBinding, name: str, out: torch.Tensor) -> None:
    """Bind a preallocated fp32 tensor as an output: ORT writes straight into it."""
    io.bind_output(name, "cpu", 0, np.float32, list(out.shape), out.data_ptr())


def check_layout(session: ort.InferenceSession, layout: GraphLayout, leading: int) -> None:
    """Refuse a graph whose LoRA inputs (after ``leading`` others) are not ``layout``'s."""
    names = [i.name for i in session.get_inputs()]
    if names[leading:] != layout.input_names:
        raise ValueError("the graph's LoRA inputs are not this base's layout")


class OnnxTextServing:
    """A text base served through an ONNX graph (see the module docstring)."""

    runtime = "onnx"

    def __init__(self, torch_serving: TextServing, graph: bytes, *, precision: str = "fp32",
                 threads: int | None = None) -> None:
        self.torch_serving = torch_serving
        self.base = torch_serving.base
        self.spec = torch_serving.spec
        self.precision = precision
        self.layout = GraphLayout.of(self.spec)
        self.session = make_session(graph, threads)
        names = [i.name for i in self.session.get_inputs()]
        self.token_names = tuple(n for n in names if not n.startswith("lora_"))
        check_layout(self.session, self.layout, len(self.token_names))
        self.head = getattr(self.base.model, self.base.head_name)
        self.hidden_size = self.spec.head_in_features

    @property
    def label(self) -> str:
        """What runs the forward pass, as the gate records it (``onnx-fp32``, ``onnx-int8``)."""
        return f"onnx-{self.precision}"

    # -- the torch serving's own row handling ---------------------------------------------------

    def decode(self, raw: Sequence[Any], *, param: str = "inputs", limits: Any = None) -> list[str]:
        return self.torch_serving.decode(raw, param=param, limits=limits)

    def check_row(self, row: Any, param: str) -> None:
        self.torch_serving.check_row(row, param)

    def collate(self, rows: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.torch_serving.collate(rows)

    def size(self, batch: dict[str, torch.Tensor]) -> int:
        return self.torch_serving.size(batch)

    def probe_rows(self) -> list[str]:
        return self.torch_serving.probe_rows()

    # -- the forward pass --------------------------------------------------------------------------

    def encode(self, batch: dict[str, torch.Tensor], lora: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph alone: (hidden ``[B, T, H]``, pooled ``[B, H]``) for tokens and LoRA inputs."""
        ids = batch["input_ids"]
        n, t = int(ids.shape[0]), int(ids.shape[1])
        tokens = []
        for name in self.token_names:
            v = batch.get(name)
            if v is None:  # a tokenizer that gives no token types: all zeros, as the model assumes
                v = torch.zeros_like(ids)
            tokens.append(v.to(torch.int64).contiguous())
        hidden = torch.empty(n, t, self.hidden_size, dtype=torch.float32)
        pooled = torch.empty(n, self.hidden_size, dtype=torch.float32)
        io = self.session.io_binding()
        for name, v in zip((*self.token_names, *self.layout.input_names), (*tokens, *lora)):
            bind_input(io, name, v)
        bind_output(io, "hidden", hidden)
        bind_output(io, "pooled", pooled)
        self.session.run_with_iobinding(io)
        return hidden, pooled

    def run(self, batch: dict[str, torch.Tensor], plan: BatchPlan,
            adapters: Sequence[LoadedAdapter | None]) -> torch.Tensor:
        n = self.size(batch)
        hidden, pooled = self.encode(batch, self.layout.feeds(plan, n))
        plan.poolings = self.torch_serving._poolings(adapters)
        if plan.poolings is not None:
            plan.tokens = (hidden, batch["attention_mask"])
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
