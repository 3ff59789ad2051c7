"""Where the ONNX forward pass spends its time, and how far faster int8 kernels could take it.

Contract: ``profile(base, recipes, tmp, graph_dir, rounds=)`` builds ``bench.onnx_int8_speed``'s
workload (32 rows x 64 random tokens, 32 distinct r=8 query/value adapters, one per row), the
fp32 graph of the query/value variant (the graph those batches are served on) and each
recipe's int8 graph of it, then

* times, interleaved in one process, torch's ``Engine.forward`` and each graph's
  ``run_with_iobinding`` on that batch's own inputs (``GraphLayout.feeds`` of the engine's plan),
  sessions opened as serving opens them (``make_session``): wall-clock medians;
* runs each graph ``rounds`` more times under ONNX Runtime's profiler and sums its kernel
  times per op type and per ``CATEGORIES`` group (milliseconds per forward, share of the sum);
* reports per graph ``ceiling_vs_torch``: torch's median time over the graph's median time
  less its int8 GEMM share (``int8_gemm`` ms scaled to the wall time by the profiled sum).
  No int8 GEMM kernel, however fast, can take that graph past it.

``kernel_rates(threads)`` times one ``[2048 x 384] @ [384 x 1536]`` product (the workload's
tokens through one FFN-in layer) as ONNX ``MatMul`` fp32, ``MatMulIntegerToFloat`` with uint8
activations and int8 or uint8 weights, and torch fp32: milliseconds and GOP/s (on CPUs with
AMX or VNNI, ORT runs uint8 x int8 on them; uint8 x uint8 may not).
"""

from __future__ import annotations

import collections
import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.graph_cache import GraphCache
from adapters.runtime.onnx.layout import GraphLayout
from adapters.runtime.onnx.quantize import quantize_int8
from adapters.runtime.onnx.runtime import cached_graph, calibration_tokens
from adapters.runtime.onnx.serving import bind_input, bind_output
from adapters.runtime.onnx.variants import make_session
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from bench.common import interleaved, median
from bench.engine import TOKENS
from bench.onnx_int8_recipes import recipe_named, recipe_names
from bench.onnx_int8_speed import DISTINCT, TARGETS

CATEGORIES: dict[str, tuple[str, ...]] = {
    "int8_gemm": ("MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "QLinearMatMul"),
    "fp32_gemm": ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"),
    "quantise": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ReduceMin", "ReduceMax", "Max",
                 "Neg", "Cast"),
    "elementwise": ("Add", "Mul", "Sub", "Div", "Gelu", "BiasGelu", "FastGelu", "Erf", "Where", "Sqrt", "Pow"),
    "norm_softmax": ("LayerNormalization", "SkipLayerNormalization", "Softmax"),
    "layout": ("Transpose", "Reshape", "Concat", "Slice", "Gather", "Unsqueeze", "Squeeze", "Shape", "Expand",
               "Flatten", "Range", "Equal", "GreaterOrEqual", "And", "ConstantOfShape"),
}


def category(op: str) -> str:
    return next((c for c, ops in CATEGORIES.items() if op in ops), "other")


def _profiled_ms(graph: bytes, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], rounds: int,
                 threads: int, prefix: Path) -> dict[str, float]:
    """Kernel milliseconds per forward by op type, over ``rounds`` profiled runs (after one warm-up)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as make_session
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
    for _ in range(1 + rounds):
        _run(session, feeds, outputs)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_measured = runs[1]["ts"] if len(runs) > 1 else 0  # the warm-up run is left out
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_measured:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / rounds
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def _run(session: ort.InferenceSession, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    io = session.io_binding()
    for name, v in feeds.items():
        bind_input(io, name, v)
    for name, out in outputs.items():
        bind_output(io, name, out)
    session.run_with_iobinding(io)


def profile(base: Any, recipes: tuple[str, ...], tmp: Path, graph_dir: Path, *, rounds: int = 9,
            threads: int | None = None) -> dict[str, Any]:
    threads = threads or torch.get_num_threads()
    catalog = Catalog(Registry(f"sqlite:///{tmp}/profile.db"), LocalStore(tmp / "profile-store"))
    catalog.registry.create_tenant("p")
    for i in range(DISTINCT):
        catalog.publish("p", f"a{i}", random_artifact(base.spec, r=8, targets=TARGETS, n_labels=2, seed=i),
                        promote=True)
    config = EngineConfig(max_resident=DISTINCT + 1, device_slots=DISTINCT + 1, max_batch_size=DISTINCT)
    engine = Engine(replace(base, model=copy.deepcopy(base.model)), catalog, config)
    targets = frozenset(p for t in TARGETS for p in base.spec.match_target(t))
    fp32, _ = cached_graph(base, engine.serving, "fp32", GraphCache(graph_dir), targets)
    graphs = {"fp32": fp32}
    for r in recipes:
        graphs[f"int8:{r}"] = quantize_int8(fp32, recipe_named(r), calibration_tokens(engine.serving))

    ids = torch.randint(1000, 20000, (DISTINCT, TOKENS), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    rows = [engine.acquire(engine.resolve("p", f"a{i}")) for i in range(DISTINCT)]
    plan = engine.slots.plan(rows)
    sessions = {label: make_session(g, threads) for label, g in graphs.items()}
    names = [i.name for i in sessions["fp32"].get_inputs()]
    lora_names = [n for n in names if n not in batch]
    layout = GraphLayout.of(base.spec, targets)
    feeds = {**{n: batch[n].contiguous() for n in names if n in batch},
             **dict(zip(layout.input_names, (t.contiguous() for t in layout.feeds(plan, DISTINCT))))}
    assert set(feeds) == set(names) and set(lora_names) == set(layout.input_names)
    outputs = {"hidden": torch.empty(DISTINCT, TOKENS, base.spec.head_in_features),
               "pooled": torch.empty(DISTINCT, base.spec.head_in_features)}

    fns = {"torch": lambda: engine.forward(batch, rows)}
    fns.update({label: (lambda s=s: _run(s, feeds, outputs)) for label, s in sessions.items()})
    with torch.inference_mode():
        times = interleaved(fns, rounds=rounds, clock=time.perf_counter)
    torch_ms = median(times["torch"]) * 1e3
    graphs_out: dict[str, Any] = {}
    for label, graph in graphs.items():
        per_op = _profiled_ms(graph, feeds, outputs, rounds, threads, tmp / f"prof-{label.replace(':', '-')}")
        total = sum(per_op.values())
        by_cat: dict[str, float] = collections.defaultdict(float)
        for op, ms in per_op.items():
            by_cat[category(op)] += ms
        wall = median(times[label]) * 1e3
        int8_wall = by_cat.get("int8_gemm", 0.0) * wall / total
        graphs_out[label] = {
            "wall_ms": wall, "ratio_vs_torch": torch_ms / wall,
            "profiled_kernel_ms": total,
            "by_category_ms": dict(by_cat), "by_category_share": {c: ms / total for c, ms in by_cat.items()},
            "by_op_ms": per_op,
            "ceiling_vs_torch": torch_ms / (wall - int8_wall),
        }
        print(f"{label}: {wall:.1f} ms ({torch_ms / wall:.2f}x torch), int8 GEMMs {by_cat.get('int8_gemm', 0):.1f} ms "
              f"of {total:.1f} profiled; ceiling with free int8 GEMMs {torch_ms / (wall - int8_wall):.2f}x", flush=True)
    return {
        "what": f"{DISTINCT} rows x {TOKENS} random tokens, {DISTINCT} distinct r=8 query/value adapters; torch: "
                f"Engine.forward; ONNX: the query/value variant's session.run_with_iobinding on the engine's own feeds",
        "threads": threads, "rounds": rounds, "torch_ms": torch_ms, "graphs": graphs_out,
    }


def kernel_rates(threads: int, rounds: int = 7, m: int = DISTINCT * TOKENS, k: int = 384, n: int = 1536
                 ) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    xq = rng.integers(0, 256, (m, k)).astype(np.uint8)
    scales = [numpy_helper.from_array(np.array(0.01, np.float32), "xs"),
              numpy_helper.from_array(np.full((n,), 0.01, np.float32), "ws")]

    def graph(op: str, a_type: int, weight: np.ndarray, extra: list[str], inits: list[Any], domain: str = "") -> bytes:
        node = helper.make_node(op, ["a", "b", *extra], ["y"], domain=domain)
        g = helper.make_graph([node], op, [helper.make_tensor_value_info("a", a_type, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(weight, "b"), *inits])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        return model.SerializeToString()

    cases = {
        "onnx fp32 MatMul": (graph("MatMul", TensorProto.FLOAT, w, [], []), x),
        "onnx MatMulIntegerToFloat u8 x s8": (graph("MatMulIntegerToFloat", TensorProto.UINT8,
                                                    rng.integers(-127, 128, (k, n)).astype(np.int8), ["xs", "ws"],
                                                    scales, "com.microsoft"), xq),
        "onnx MatMulIntegerToFloat u8 x u8": (graph("MatMulIntegerToFloat", TensorProto.UINT8,
                                                    rng.integers(0, 256, (k, n)).astype(np.uint8), ["xs", "ws"],
                                                    scales, "com.microsoft"), xq),
    }
    sessions = {label: (make_session(g, threads), a) for label, (g, a) in cases.items()}
    tw, tx = torch.from_numpy(w), torch.from_numpy(x)
    fns = {label: (lambda s=s, a=a: s.run(None, {"a": a})) for label, (s, a) in sessions.items()}
    fns["torch fp32 matmul"] = lambda: tx @ tw
    times = interleaved(fns, rounds=rounds, clock=time.perf_counter)
    ops = 2 * m * k * n
    return {"shape": [m, k, n], "threads": threads,
            "ms": {label: median(ts) * 1e3 for label, ts in times.items()},
            "gop_per_s": {label: ops / median(ts) / 1e9 for label, ts in times.items()}}


def main() -> None:
    """``python -m bench.onnx_profile [--quick] --out FILE``."""
    import os
    import tempfile

    from adapters.base import load_base
    from adapters.runtime.onnx.quantize import DEFAULT_RECIPE
    from bench.common import machine, parser, write

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--recipes", default=f"{DEFAULT_RECIPE.name},per-token-smooth")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--graph-cache", type=Path, default=None, help="keep the fp32 exports here between runs")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    recipes = recipe_names(args.recipes)
    rounds = min(args.rounds, 3) if args.quick else args.rounds
    with tempfile.TemporaryDirectory(prefix="tailor-onnx-profile-") as tmp:
        result = profile(load_base(), recipes, Path(tmp), args.graph_cache or Path(tmp) / "graphs",
                         rounds=rounds, threads=args.threads)
    result["kernels"] = kernel_rates(args.threads, rounds=rounds)
    print("kernels GOP/s", {k: round(v) for k, v in result["kernels"]["gop_per_s"].items()}, flush=True)
    write(args.out, {**result, "quick": args.quick, "machine": machine()})
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_figure

    graphs = result["graphs"]
    labels = ["torch", *graphs]
    cats = [*CATEGORIES, "other"]
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    ax.barh(0, result["torch_ms"], color="0.6", label="torch (whole forward)")
    for i, label in enumerate(graphs, start=1):
        g = graphs[label]
        scale = g["wall_ms"] / g["profiled_kernel_ms"]  # kernel sums drawn at the wall time's scale
        left = 0.0
        for j, c in enumerate(cats):
            ms = g["by_category_ms"].get(c, 0.0) * scale
            ax.barh(i, ms, left=left, color=f"C{j}", label=c if i == 1 else None)
            left += ms
    ax.axvline(result["torch_ms"] / 2.5, color="red", linestyle="--", linewidth=1, label="2.5x torch")
    ax.set_yticks(range(len(labels)), [lab.removeprefix("int8:") for lab in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per forward (wall; ONNX split by profiled kernel time)")
    ax.set_title(result["what"], fontsize=6)
    ax.legend(fontsize=6, loc="lower right")
    k = result.get("kernels")
    if k:
        kx.barh(range(len(k["gop_per_s"])), list(k["gop_per_s"].values()))
        kx.set_yticks(range(len(k["gop_per_s"])), list(k["gop_per_s"]), fontsize=7)
        kx.invert_yaxis()
        kx.set_xlabel(f"GOP/s, one {k['shape'][0]}x{k['shape'][1]} @ {k['shape'][1]}x{k['shape'][2]} product")
    save_figure(fig, png)


if __name__ == "__main__":
    main()
