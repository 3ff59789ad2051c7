"""The ONNX Runtime rows of ``bench.engine`` (text): the same batches as torch, interleaved.

Methods added to the run (``OnnxRig.fns``):

* ``onnx_base`` / ``onnx_base_int8``: the plain base model (its own head, no LoRA inputs)
  exported with the same exporter and opset, fp32 and dynamically quantised (weight matmuls
  only): the upper bound of each precision.
* ``onnx_fp32`` / ``onnx_int8``: Tailor's engine with its serving swapped for
  ``OnnxTextServing`` (``adapters.runtime.onnx``) -- the same ``Engine.forward`` call as the
  ``tailor`` row, so slot planning, LoRA gathering, pooling and the per-row heads are timed too
  -- as served: on the graph variant of the batch's target set (query/value), built on the
  first batch that asks for it (``adapters.runtime.onnx.variants``; the build is awaited before
  timing and its time reported).
* ``onnx_fp32_all`` / ``onnx_int8_all``: the same engines with variants off, so every batch
  runs the universal graph (a LoRA branch, zero-width where no row targets it, on every
  adaptable layer): what the variants save, side by side.

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
from adapters.runtime.onnx.graph_edit import drop_nan_guards
from adapters.runtime.onnx.quantize import quantize_int8
from adapters.runtime.onnx.runtime import apply_runtime, calibration_tokens
from adapters.runtime.onnx.serving import make_session

METHODS = ("onnx_base", "onnx_base_int8", "onnx_fp32", "onnx_int8", "onnx_fp32_all", "onnx_int8_all")
ENGINES = {"fp32": ("none", "build"), "int8": ("int8", "build"), "fp32_all": ("none", "off"), "int8_all": ("int8", "off")}


@dataclass
class OnnxRig:
    engines: dict[str, Engine]  # ENGINES: Tailor engines serving on ONNX (precision, variants policy)
    base_sessions: dict[str, Any]  # "fp32" / "int8": the plain base graph
    facts: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    outside_ms: dict[str, float] = field(default_factory=dict)
    alternative: dict[str, Any] = field(default_factory=dict)  # compare_slot_bank_graph at the largest count

    @classmethod
    def build(cls, base: Any, pristine: torch.nn.Module, catalog: Catalog, config: EngineConfig,
              tmp: Path) -> OnnxRig:
        graphs = tmp / "graphs"
        engines: dict[str, Engine] = {}
        facts: dict[str, Any] = {}
        for name, (quantize, variants) in ENGINES.items():
            engine = Engine(replace(base, model=copy.deepcopy(base.model)), catalog, config)
            report = apply_runtime(engine, RuntimeChoice("onnx", quantize), graphs, variants=variants)
            if report.runtime != "onnx":
                raise RuntimeError(f"the base did not serve on ONNX: {report.reason}")
            engines[name] = engine
            if name.endswith("_all"):
                continue
            again = Engine(replace(base, model=copy.deepcopy(base.model)), catalog, config)
            t0 = time.perf_counter()
            apply_runtime(again, RuntimeChoice("onnx", quantize), graphs)  # a restart: from the cache
            facts[name] = {"first_start_seconds": report.built_seconds, "graph_bytes": report.graph_bytes,
                           "cached_start_seconds": time.perf_counter() - t0}
        facts["first_start_what"] = ("the universal graph. fp32: export + checksum'd store + parity check on probe "
                                     "texts; int8: quantisation of the cached fp32 graph")
        plain = _export_plain(pristine, base)
        calibration = calibration_tokens(engines["fp32"].serving.torch_serving)
        sessions = {"fp32": make_session(plain), "int8": make_session(quantize_int8(plain, calibration=calibration))}
        return cls(engines=engines, base_sessions=sessions, facts=facts)

    def fns(self, batch: dict[str, torch.Tensor], rows: list) -> dict[str, Any]:
        feeds = {k: v.numpy() for k, v in batch.items()}
        if "token_type_ids" in {i.name for i in self.base_sessions["fp32"].get_inputs()} and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        e = self.engines
        return {
            "onnx_base": lambda: self.base_sessions["fp32"].run(None, feeds),
            "onnx_base_int8": lambda: self.base_sessions["int8"].run(None, feeds),
            "onnx_fp32": lambda: e["fp32"].forward(batch, rows),
            "onnx_int8": lambda: e["int8"].forward(batch, rows),
            "onnx_fp32_all": lambda: e["fp32_all"].forward(batch, rows),
            "onnx_int8_all": lambda: e["int8_all"].forward(batch, rows),
        }

    def warm_variants(self, batch: dict[str, torch.Tensor], rows: list) -> None:
        """Ask each variant-building engine for this batch's target set and wait for the build
        (fp32 first: int8 quantises the cached fp32 variant); record its time and size."""
        for name in ("fp32", "int8"):
            serving = self.engines[name].serving
            if any(v is not serving.graphs.first for v in serving.graphs.ready()):
                continue
            self.engines[name].forward(batch, rows)
            serving.graphs.settle()
            built = [v for v in serving.graphs.ready() if v is not serving.graphs.first]
            if not built:
                raise RuntimeError(f"no {name} graph variant was built for the benchmark's target set")
            self.facts[name]["variant"] = {"adapted_layers": built[0].width, "graph_bytes": built[0].nbytes,
                                           "first_use_build_seconds": built[0].built_seconds}

    def check(self, k: int, batch: dict[str, torch.Tensor], rows: list, torch_logits: torch.Tensor) -> None:
        """Parity of both precisions with torch on this batch, and the cost outside the graph."""
        self.warm_variants(batch, rows)
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
                plan = engine.slots.plan(rows)
                serving.variant(plan).layout.feeds(plan, n)
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
    return drop_nan_guards(buf.getvalue())  # as Tailor's graph (adapters.runtime.onnx.export)


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
        "onnx_fp32_all_vs_onnx_base": ("onnx_fp32_all", "onnx_base"),  # the universal graph alone
        "onnx_int8_all_vs_onnx_base_int8": ("onnx_int8_all", "onnx_base_int8"),
        "onnx_fp32_vs_onnx_fp32_all": ("onnx_fp32", "onnx_fp32_all"),  # what the variant saves
        "onnx_int8_vs_onnx_int8_all": ("onnx_int8", "onnx_int8_all"),
        "onnx_base_vs_base": ("onnx_base", "base"),
        "onnx_base_int8_vs_base": ("onnx_base_int8", "base"),
    }
    return {name: r for name, (a, b) in pairs.items() if (r := paired(a, b)) is not None}


# -- the alternative: the stacked slot bank and a per-row slot index as graph inputs ---------------

class SlotBankGraph:
    """The design the kept one was measured against: the graph takes the engine's whole slot
    bank (per group ``A [S, d_in, C_cap]``, per module ``B [S, R_cap, d_out]``, columns at the
    bank's rank capacities) and ``slot_idx [B]``, and gathers each row's weights inside the graph
    (``Gather``). Built from the exporter's own layers (a benchmark-only variant)."""

    def __init__(self, base: Any, slots: Any) -> None:
        from adapters.runtime.onnx import export as ex
        from adapters.runtime.onnx.layout import GraphLayout
        from adapters.runtime.lora_layer import MultiLoraLinear
        from adapters.pooling import backbone

        layout = GraphLayout.of(base.spec)

        class Gathered(ex._Feeds):
            def set(self, tensors: tuple[torch.Tensor, ...]) -> None:
                idx = tensors[-1]
                super().set(tuple(t.index_select(0, idx) for t in tensors[:-1]))

        model = copy.deepcopy(base.model).float().eval()
        feeds = Gathered(layout)
        for p in base.spec.linear_shapes:
            parent_path, _, child = p.rpartition(".")
            parent = model.get_submodule(parent_path)
            layer = getattr(parent, child)
            lin = layer.base_layer if isinstance(layer, MultiLoraLinear) else layer
            setattr(parent, child, ex._GraphLora(lin, p, feeds))
        sample = base.tokenize(["a short text", "and a second, somewhat longer text to pad"])
        names = tuple(n for n in ex.TOKEN_INPUTS if n in sample)
        wrapper = ex._Wrapper(backbone(model), feeds, names).eval()
        lora = layout.sample(batch=3)
        args = tuple(sample[n] for n in names) + tuple(lora) + (torch.tensor([0, 2]),)
        axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
        for n, spec_axes in layout.dynamic_axes().items():
            axes[n] = {k: ("slots" if v == "lora_batch" else v) for k, v in spec_axes.items()}
        axes["slot_idx"] = {0: "batch"}
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, buf, dynamo=False, opset_version=OPSET,
                              input_names=[*names, *layout.input_names, "slot_idx"], output_names=["hidden", "pooled", "layers_mean"],
                              dynamic_axes={**axes, "hidden": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"},
                                            "layers_mean": {0: "batch", 1: "sequence"}})
        self.session = make_session(buf.getvalue())
        self.layout, self.slots, self.names = layout, slots, names

    def bank_inputs(self) -> list[torch.Tensor]:
        """The bank's stacks as they are (no copy), in the layout's input order."""
        bank = self.slots
        s = bank.capacity
        a = [bank._groups[g.name].a if bank._groups[g.name].a is not None else torch.zeros(s, g.d_in, 0)
             for g in self.layout.groups]
        b = [bank._b[m] if m in bank._b else torch.zeros(s, 0, self.layout.shapes[m][1])
             for g in self.layout.groups for m in g.modules]
        return [t.contiguous() for t in a + b]

    def run(self, batch: dict[str, torch.Tensor], rows: list) -> Any:
        with torch.inference_mode():
            self.slots.plan(rows)  # makes the batch's adapters resident (its gathered copy is unused here)
            idx = torch.tensor([0 if r is None else self.slots._slot_of[r.key] for r in rows])
        feeds = {n: batch[n].numpy() if n in batch else np.zeros_like(batch["input_ids"].numpy()) for n in self.names}
        feeds.update({n: t.numpy() for n, t in zip(self.layout.input_names, self.bank_inputs())})
        feeds["slot_idx"] = idx.numpy()
        return self.session.run(None, feeds)


def compare_slot_bank_graph(base: Any, engine: Engine, batch: dict[str, torch.Tensor], rows: list,
                            rounds: int) -> dict[str, Any]:
    """Time the kept design's graph call (gathered inputs, ``plan`` + ``feeds`` included) against
    the slot-bank variant's (assignment + in-graph gather), interleaved on one batch."""
    from bench.common import interleaved

    variant = SlotBankGraph(base, engine.slots)
    serving = engine.serving
    n = len(rows)

    def kept() -> Any:
        with torch.inference_mode():
            plan = engine.slots.plan(rows)
            return serving.encode(batch, serving.layout.feeds(plan, n))

    kept_pooled = kept()[1]
    variant_pooled = torch.from_numpy(variant.run(batch, rows)[1])
    times = interleaved({"gathered_inputs": kept, "slot_bank_in_graph": lambda: variant.run(batch, rows)},
                        rounds=rounds)
    return {"rows": n, "distinct_adapters": len({r.key for r in rows if r is not None}),
            "ms": {k: float(np.median(v) * 1e3) for k, v in times.items()},
            "paired_slot_bank_vs_gathered": float(np.median(
                [g / s for g, s in zip(times["gathered_inputs"], times["slot_bank_in_graph"])])),
            "max_abs_diff_pooled": float((kept_pooled - variant_pooled).abs().max()),
            "slot_bank_capacity": engine.slots.capacity}


def main() -> None:
    """``python -m bench.engine_onnx [--quick] --out FILE``: the ONNX rows with the torch rows
    they are compared with (``base``, ``tailor``) on the same batches, interleaved -- the full
    ``bench.engine`` run without peft, ``set_adapter`` and the cold-load/memory phases (for a
    machine too busy to run all of it)."""
    import os
    import tempfile

    from adapters.base import load_base
    from adapters.registry import Registry
    from adapters.store import LocalStore
    from bench.common import interleaved, machine, parser, plot_lines, write
    from bench.engine import BASE_ROWS, COUNTS, text_workload

    p = parser("ONNX Runtime vs torch, mixed-tenant batches (MiniLM)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--counts", default=",".join(map(str, COUNTS)), help="distinct adapters per batch, comma list")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--no-slot-bank", action="store_true", help="skip the slot-bank-in-graph comparison (an export)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: each call's CPU time on the calling thread (with --threads 1 every method computes "
                        "there), robust to a machine shared with other jobs")
    args = p.parse_args()
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread needs --threads 1 (every method computing on the calling thread)")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = tuple(int(c) for c in args.counts.split(","))
    torch.manual_seed(0)
    w = text_workload(quick=args.quick, base=load_base())
    rounds = args.rounds or (5 if args.quick else 15)
    with tempfile.TemporaryDirectory(prefix="tailor-bench-onnx-") as tmp_name:
        tmp = Path(tmp_name)
        catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
        catalog.registry.create_tenant("bench", quotas={"max_adapters": 1000})
        engine = Engine(w.base, catalog, EngineConfig(device_slots=129, max_batch_size=128))
        for i in range(max(counts)):
            catalog.publish("bench", f"a{i}", w.artifact(i), promote=True)
        loaded = [engine.acquire(engine.resolve("bench", f"a{i}")) for i in range(max(counts))]
        pristine = w.pristine.eval()
        rig = OnnxRig.build(w.base, pristine, catalog, engine.config, tmp)
        rows_per_s: dict[str, dict[str, float]] = {m: {} for m in ("base", "tailor", *METHODS)}
        paired: dict[str, dict[str, float]] = {}
        for k in counts:
            n = max(BASE_ROWS, k)
            batch = w.inputs(n)
            rows = [loaded[i % k] for i in range(n)]
            ours = torch.stack(list(engine.forward(batch, rows).logits))
            rig.check(k, batch, rows, ours)
            fns = {"base": lambda: _plain(w, pristine, batch), "tailor": lambda: engine.forward(batch, rows),
                   **rig.fns(batch, rows)}
            times = interleaved(fns, rounds=rounds, clock=clock)
            for m, ts in times.items():
                rows_per_s[m][str(k)] = n / float(np.median(ts))
            paired[str(k)] = ratios(times)
            if k == 32 and not args.no_slot_bank:
                rig.alternative = compare_slot_bank_graph(w.base, rig.engines["fp32"], batch, rows, rounds)
            print(k, {m: round(v[str(k)], 1) for m, v in rows_per_s.items()}, paired[str(k)], flush=True)
    result = {
        "task": "text", "quick": args.quick, "machine": machine(), "device": "cpu", "dtype": "float32",
        "what": "bench.engine's ONNX rows beside its torch base and tailor rows (no peft, set_adapter, cold loads)",
        "batch": {"rows": {str(k): max(BASE_ROWS, k) for k in counts}, **w.describe, "rounds": rounds,
                  "statistic": "median", "clock": args.clock},
        "rows_per_s": rows_per_s,
        "onnx": {"graphs": rig.facts, "parity_vs_torch": rig.parity, "paired_ratios": paired,
                 "paired_what": "median over rounds of (slower method's time / faster method's time) in the same "
                                "round: X_vs_Y is how many times faster X ran than Y",
                 "plan_and_feeds_ms": rig.outside_ms, "slot_bank_in_graph": rig.alternative},
    }
    write(args.out, result)
    plot_lines(args.out.with_suffix(".png"), "Mixed-tenant throughput, torch vs ONNX Runtime (MiniLM, r=8 q/v, 64 tokens)",
               "distinct adapters in the batch", "rows / s",
               {m: {int(k): v for k, v in per.items()} for m, per in rows_per_s.items()}, logx=True)


def _plain(w: Any, model: torch.nn.Module, batch: Any) -> Any:
    with torch.inference_mode():
        return w.call(model, batch)


if __name__ == "__main__":
    main()
