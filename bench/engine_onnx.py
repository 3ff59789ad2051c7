"""The ONNX Runtime rows of ``bench.engine`` (text): the same batches as torch, interleaved.

Methods added to the run (``OnnxRig.fns``):

* ``onnx_base`` / ``onnx_base_int8``: the plain base model (its own head, no LoRA inputs)
  exported with the same exporter and opset, fp32 and dynamically quantised (weight matmuls
  only): the upper bound of each precision.
* ``onnx_fp32`` / ``onnx_int8``: Tailor's engine with its serving swapped for
  ``OnnxTextServing`` (``adapters.runtime.onnx``) -- the same ``Engine.forward`` call as the
  ``tailor`` row, so slot planning, LoRA gathering, pooling and the per-row heads are timed too.

Also reported: first-start export time and graph size per precision (and a start that reads
the graph cache), parity with torch on each count's batch (fp32: max abs logit diff; int8:
argmax agreement and max diff), and the per-batch cost the kept design pays outside the graph
(``SlotBank.plan`` + ``GraphLayout.feeds``): the most that gathering the slots inside the graph
instead (a stacked slot bank and per-row slot index as inputs) could save.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.catalog import Catalog
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.choice import RuntimeChoice
from adapters.runtime.onnx.export import OPSET
from adapters.runtime.onnx.quantize import quantize_int8
from adapters.runtime.onnx.runtime import apply_runtime
from adapters.runtime.onnx.serving import make_session

METHODS = ("onnx_base", "onnx_base_int8", "onnx_fp32", "onnx_int8")


@dataclass
class OnnxRig:
    engines: dict[str, Engine]  # "fp32" / "int8": Tailor engines serving on ONNX
    base_sessions: dict[str, Any]  # "fp32" / "int8": the plain base graph
    facts: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    outside_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, base: Any, pristine: torch.nn.Module, catalog: Catalog, config: EngineConfig,
              tmp: Path) -> OnnxRig:
        graphs = tmp / "graphs"
        engines: dict[str, Engine] = {}
        facts: dict[str, Any] = {}
        for precision, quantize in (("fp32", "none"), ("int8", "int8")):
            engine = Engine(replace(base, model=copy.deepcopy(base.model)), catalog, config)
            report = apply_runtime(engine, RuntimeChoice("onnx", quantize), graphs)
            if report.runtime != "onnx":
                raise RuntimeError(f"the base did not serve on ONNX: {report.reason}")
            again = Engine(replace(base, model=copy.deepcopy(base.model)), catalog, config)
            t0 = time.perf_counter()
            apply_runtime(again, RuntimeChoice("onnx", quantize), graphs)  # a restart: from the cache
            facts[precision] = {"first_start_seconds": report.built_seconds, "graph_bytes": report.graph_bytes,
                                "cached_start_seconds": time.perf_counter() - t0}
            engines[precision] = engine
        facts["first_start_what"] = ("fp32: export + checksum'd store + parity check on probe texts; "
                                     "int8: quantisation of the cached fp32 graph")
        plain = _export_plain(pristine, base)
        sessions = {"fp32": make_session(plain), "int8": make_session(quantize_int8(plain))}
        return cls(engines=engines, base_sessions=sessions, facts=facts)

    def fns(self, batch: dict[str, torch.Tensor], rows: list) -> dict[str, Any]:
        feeds = {k: v.numpy() for k, v in batch.items()}
        if "token_type_ids" in {i.name for i in self.base_sessions["fp32"].get_inputs()} and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        e32, e8 = self.engines["fp32"], self.engines["int8"]
        return {
            "onnx_base": lambda: self.base_sessions["fp32"].run(None, feeds),
            "onnx_base_int8": lambda: self.base_sessions["int8"].run(None, feeds),
            "onnx_fp32": lambda: e32.forward(batch, rows),
            "onnx_int8": lambda: e8.forward(batch, rows),
        }

    def check(self, k: int, batch: dict[str, torch.Tensor], rows: list, torch_logits: torch.Tensor) -> None:
        """Parity of both precisions with torch on this batch, and the cost outside the graph."""
        out: dict[str, Any] = {}
        for precision, engine in self.engines.items():
            logits = torch.stack(list(engine.forward(batch, rows).logits)).float()
            diff = float((logits - torch_logits.float()).abs().max())
            agree = float((logits.argmax(-1) == torch_logits.argmax(-1)).float().mean())
            out[precision] = {"max_abs_diff": diff, "argmax_agreement": agree}
        self.parity[str(k)] = out
        engine = self.engines["fp32"]
        serving = engine.serving
        n = len(rows)
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            with torch.inference_mode():
                serving.layout.feeds(engine.slots.plan(rows), n)
            ts.append(time.perf_counter() - t0)
        self.outside_ms[str(k)] = float(np.median(ts) * 1e3)


def _export_plain(model: torch.nn.Module, base: Any) -> bytes:
    """The untouched base with its own head, exported like Tailor's graph (for the upper bound)."""
    sample = base.tokenize(["a short text", "and a second, somewhat longer text to pad"])
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, args))).logits

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Plain().eval(), tuple(sample[n] for n in names), buf, dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}})
    return buf.getvalue()


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Paired per-round speed ratios of one count's times (median over rounds of time / time)."""
    def paired(fast: str, slow: str) -> float | None:
        if fast not in times or slow not in times:
            return None
        return float(np.median([s / f for f, s in zip(times[fast], times[slow])]))

    pairs = {
        "onnx_int8_vs_tailor": ("onnx_int8", "tailor"),  # target >= 2.5 at 32 adapters
        "onnx_fp32_vs_tailor": ("onnx_fp32", "tailor"),
        "onnx_fp32_vs_onnx_base": ("onnx_fp32", "onnx_base"),  # target >= 0.9
        "onnx_int8_vs_onnx_base_int8": ("onnx_int8", "onnx_base_int8"),
        "onnx_base_vs_base": ("onnx_base", "base"),
        "onnx_base_int8_vs_base": ("onnx_base_int8", "base"),
    }
    return {name: r for name, (a, b) in pairs.items() if (r := paired(a, b)) is not None}
