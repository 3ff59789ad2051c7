"""Engine benchmark: mixed-tenant batches on a real base against peft and the base alone.

    python -m bench.engine [--task text|image] [--quick] --out bench/results/engine-cpu.json

Methods, timed interleaved in one process so machine noise hits them alike:
``base`` (the plain model with one head, no adapters: the upper bound), ``tailor`` (our engine),
``peft_mixed`` (peft's ``adapter_names=`` mixed batch) and ``naive_swap`` (peft ``set_adapter``
and one request at a time), at 1, 8, 32 and 64 distinct adapters per batch of ``max(32, k)``
rows. Also measured: cold-load latency from a store holding many registered adapters, and
host bytes per resident adapter.

``--task text`` (default): MiniLM, r=8 query/value adapters, 64 tokens; 10,000 registered
adapters (500 with --quick); ``tailor`` is ``Engine.forward`` on tokenised inputs.
With ``--task text`` the same run also times ONNX Runtime (``bench.engine_onnx``): the plain
base exported (fp32, int8) and Tailor's engine serving through ``adapters.runtime.onnx`` (fp32,
int8) on the same batches, interleaved with the torch methods, plus export time, graph size,
parity with torch and paired ratios (``onnx.paired_ratios``).
``--task image``: ``bench.engine_image`` (EfficientNet-Lite0, Conv2d LoRA on its pointwise
convolutions; ``tailor`` is ``Engine.predict_rows`` on decoded images).

A task's figures come from a ``Workload`` (its base, adapters, inputs and calls); the harness
here (timing, correctness check against peft, cold loads, memory, JSON and plot) is shared.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from peft import PeftModel
from tqdm import tqdm

from adapters.artifact import AdapterArtifact
from adapters.catalog import Catalog
from adapters.peft_format import export_peft
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from bench.common import interleaved, machine, median, parser, percentile, plot_lines, write

COUNTS = (1, 8, 32, 64)
TOKENS = 64
BASE_ROWS = 32
METHODS = ("base", "tailor", "peft_mixed", "naive_swap")
QUOTAS = {"max_adapters": 100_000, "max_storage_bytes": 1 << 40}


@dataclass
class Workload:
    """What the harness needs of one task's base (see the module docstring)."""

    title: str  # the plot's title
    base: Any  # the base the engine serves (it wraps its model in place)
    pristine: torch.nn.Module  # an untouched copy with a plain head: ``base`` and peft's model
    artifact: Callable[[int], AdapterArtifact]  # seed -> a random adapter of the benchmark's shape
    inputs: Callable[[int], Any]  # n -> a collated batch of n rows on the base's device
    call: Callable[..., torch.Tensor]  # (model, batch, **peft kwargs) -> logits of a plain/peft model
    row: Callable[[Any, int], Any]  # (batch, i) -> row i alone, as a batch
    tailor: Callable[[Engine, Any, list], Any]  # (engine, batch, adapters per row): what is timed
    describe: dict[str, Any] = field(default_factory=dict)  # the batch's shape, for the JSON
    rounds: int = 21
    n_registered: int = 10_000  # adapters in the store for the cold loads
    n_memory: int = 400  # adapters made resident to measure bytes per adapter
    counts: tuple[int, ...] = COUNTS  # distinct adapters per batch
    notes: dict[str, Any] = field(default_factory=dict)  # anything else the JSON should say
    onnx: bool = False  # also time ONNX Runtime (bench.engine_onnx; text bases)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--task", choices=("text", "image"), default="text")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    if args.task == "image":
        from bench.engine_image import image_workload

        workload = image_workload(quick=args.quick)
    else:
        workload = text_workload(quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="tailor-bench-") as tmp:
        result = run(workload, Path(tmp))
    result = {"task": args.task, **result, "quick": args.quick}
    write(args.out, result)
    plot_lines(
        args.out.with_suffix(".png"), workload.title, "distinct adapters in the batch", "rows / s",
        {m: {int(k): v for k, v in per_k.items()} for m, per_k in result["rows_per_s"].items() if per_k},
        logx=True,
    )


def text_workload(*, quick: bool, base: Any = None) -> Workload:
    """``base``: a text base to use instead of loading MiniLM (tests: a tiny one)."""
    from adapters.base import load_base

    base = base or load_base()
    device = base.device

    def inputs(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 20000, (n, TOKENS), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return Workload(
        title=f"Mixed-tenant throughput ({base.spec.name or 'MiniLM'}, r=8 q/v, {TOKENS} tokens)", base=base,
        pristine=copy.deepcopy(base.model),
        artifact=lambda seed: random_artifact(base.spec, r=8, targets=("query", "value"), n_labels=2, seed=seed),
        inputs=inputs, call=lambda model, batch, **kw: model(**batch, **kw).logits,
        row=lambda batch, i: {k: v[i : i + 1] for k, v in batch.items()},
        tailor=lambda engine, batch, rows: engine.forward(batch, rows),
        describe={"tokens": TOKENS, "rank": 8, "targets": ["query", "value"]},
        rounds=7 if quick else 21, n_registered=500 if quick else 10_000, onnx=True,
    )


def run(w: Workload, tmp: Path) -> dict[str, Any]:
    base = w.base
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    engine = Engine(base, catalog, EngineConfig(device_slots=129, max_batch_size=128))
    for tenant in ["bench", "mem", *(f"t{i}" for i in range(100))]:  # "mem" holds the memory sample
        catalog.registry.create_tenant(tenant, quotas=QUOTAS)

    arts = [w.artifact(i) for i in range(max(w.counts))]
    records = [catalog.publish("bench", f"a{i}", a, promote=True) for i, a in enumerate(arts)]
    loaded = [engine.acquire(engine.resolve("bench", f"a{i}")) for i in range(len(arts))]
    peft_model = build_peft(w.pristine, arts, base.spec, tmp / "peft").to(base.device)
    pristine = w.pristine.eval()

    rig = None
    if w.onnx:
        from bench.engine_onnx import METHODS as ONNX_METHODS, OnnxRig, ratios as onnx_ratios

        rig = OnnxRig.build(base, pristine, catalog, engine.config, tmp)
    rows_per_s: dict[str, dict[str, float]] = {m: {} for m in METHODS + (ONNX_METHODS if rig else ())}
    max_diff = 0.0
    peft_mixed = peft_mixed_support(w, peft_model)
    paired: dict[str, dict[str, float]] = {m: {} for m in rows_per_s if m != "tailor"}
    onnx_paired: dict[str, dict[str, float]] = {}
    for k in tqdm(w.counts, desc="throughput"):
        n = max(BASE_ROWS, k)
        batch = w.inputs(n)
        names = [f"a{i % k}" for i in range(n)]
        rows = [loaded[i % k] for i in range(n)]

        def run_base() -> Any:
            with torch.inference_mode():
                return w.call(pristine, batch)

        def run_tailor() -> Any:
            return w.tailor(engine, batch, rows)

        def run_peft() -> Any:
            with torch.inference_mode():
                return w.call(peft_model, batch, adapter_names=names)

        def run_naive() -> Any:
            return [solo(peft_model, w, batch, i, name) for i, name in enumerate(names)]

        ours = torch.stack(list(engine.forward(batch, rows).logits))
        if peft_mixed["supported"]:
            reference = run_peft()
        else:  # each row through peft alone
            reference = torch.cat([solo(peft_model, w, batch, i, name) for i, name in enumerate(names)])
        max_diff = max(max_diff, (ours.float() - reference.float()).abs().max().item())
        fns = {"base": run_base, "tailor": run_tailor, "peft_mixed": run_peft, "naive_swap": run_naive}
        if not peft_mixed["supported"]:
            del fns["peft_mixed"]
        if rig is not None:
            rig.check(k, batch, rows, ours)
            fns.update(rig.fns(batch, rows))
            if k == max(w.counts):  # the design not kept: the slot bank gathered inside the graph
                from bench.engine_onnx import compare_slot_bank_graph

                rig.alternative = compare_slot_bank_graph(base, rig.engines["fp32"], batch, rows, w.rounds)
        times = interleaved(fns, rounds=w.rounds)
        if rig is not None:
            onnx_paired[str(k)] = onnx_ratios(times)
        for m, ts in times.items():
            rows_per_s[m][str(k)] = n / median(ts)
            if m != "tailor":  # the same round's times: robust to the machine's load drifting
                paired[m][str(k)] = median([o / t for o, t in zip(ts, times["tailor"])])

    t = rows_per_s["tailor"]
    ratios = {f"ratio_vs_{m}": {k: t[k] / rows_per_s[m][k] for k in rows_per_s[m]}
              for m in ("base", "peft_mixed", "naive_swap")}
    cold = cold_loads(engine, catalog, w.artifact, w.n_registered)
    per_adapter = memory_per_adapter(engine, catalog, w.artifact, w.n_memory)
    return {
        "machine": machine(), "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        **w.notes,
        "batch": {"rows": {str(k): max(BASE_ROWS, k) for k in w.counts}, **w.describe,
                  "rounds": w.rounds, "statistic": "median"},
        "rows_per_s": rows_per_s, **ratios,
        "paired_ratio": {"what": "median over rounds of (other method's time / tailor's time) in the same round",
                         **{f"vs_{m}": v for m, v in paired.items()}},
        "allocator": "glibc's dynamic mmap threshold, arenas capped at 2, each resident adapter's buffer its own "
                     "mapping (adapters.runtime.memory), as served"
                     if engine.config.tune_allocator else "default",
        "peft_mixed": peft_mixed,
        "max_abs_diff_vs_peft": max_diff,
        **({} if rig is None else {"onnx": {
            "graphs": rig.facts, "parity_vs_torch": rig.parity, "paired_ratios": onnx_paired,
            "paired_what": "median over rounds of (slower method's time / faster method's time) in the same round: "
                           "X_vs_Y is how many times faster X ran than Y",
            "plan_and_feeds_ms": rig.outside_ms,
            "slot_bank_in_graph": rig.alternative,
            "plan_and_feeds_what": "per batch, outside the graph: SlotBank.plan + GraphLayout.feeds (the most an "
                                   "in-graph gather of a stacked slot bank could save)"}}),
        "cold_load_ms": cold,
        **per_adapter,
        "adapter_file_bytes": records[0].nbytes,
    }


@torch.inference_mode()
def solo(peft_model: PeftModel, w: Workload, batch: Any, i: int, name: str) -> torch.Tensor:
    """Row ``i`` of ``batch`` through peft with adapter ``name`` alone."""
    peft_model.set_adapter(name)
    return w.call(peft_model, w.row(batch, i))


def peft_mixed_support(w: Workload, peft_model: PeftModel) -> dict[str, Any]:
    """Whether peft runs a mixed-adapter batch (``adapter_names=``) on this model: one small try."""
    batch = w.inputs(2)
    try:
        with torch.inference_mode():
            w.call(peft_model, batch, adapter_names=["a0", "a1"])
    except Exception as e:  # noqa: BLE001 - whatever peft refuses with is the finding
        return {"supported": False, "error": f"{type(e).__name__}: {e}"[:500]}
    return {"supported": True}


def build_peft(pristine: torch.nn.Module, arts: list, spec, folder: Path) -> PeftModel:
    """A copy of ``pristine`` with every adapter of ``arts`` loaded into peft from our export."""
    model = copy.deepcopy(pristine)
    peft_model = None
    for i, art in enumerate(tqdm(arts, desc="peft adapters")):
        d = folder / f"a{i}"
        d.mkdir(parents=True)
        for fname, data in export_peft(art, spec).items():
            (d / fname).write_bytes(data)
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(d), adapter_name=f"a{i}")
        else:
            peft_model.load_adapter(str(d), adapter_name=f"a{i}")
    assert peft_model is not None
    return peft_model.eval()


def cold_loads(engine: Engine, catalog: Catalog, artifact: Callable[[int], AdapterArtifact], n_registered: int,
               n_samples: int = 300) -> dict[str, Any]:
    """Register ``n_registered`` adapters, then time first loads of a random sample of them."""
    t0 = time.perf_counter()
    for i in tqdm(range(n_registered), desc="registering"):
        catalog.publish(f"t{i % 100}", f"cold{i}", artifact(100_000 + i), promote=True)
    register_s = time.perf_counter() - t0
    picks = random.Random(0).sample(range(n_registered), min(n_samples, n_registered))
    ms = []
    for i in picks:
        resolved = engine.resolve(f"t{i % 100}", f"cold{i}")
        t = time.perf_counter()
        engine.acquire(resolved)
        ms.append((time.perf_counter() - t) * 1e3)
    resolve_ms = []
    for i in picks[:100]:
        t = time.perf_counter()
        engine.resolve(f"t{i % 100}", f"cold{i}")
        resolve_ms.append((time.perf_counter() - t) * 1e3)
    return {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99), "samples": len(ms),
            "registered": n_registered, "register_seconds": register_s,
            "resolve_ms_p50": percentile(resolve_ms, 0.5),
            "what": "store read + sha256 check + safetensors decode + base check + layout, into the host resident set"}


def memory_per_adapter(engine: Engine, catalog: Catalog, artifact: Callable[[int], AdapterArtifact],
                       n: int = 400) -> dict[str, Any]:
    """Host bytes per resident adapter: tensor bytes, and the process RSS growth per adapter."""
    for i in range(n):
        catalog.publish("mem", f"m{i}", artifact(900_000 + i), promote=True)
    resolved = [engine.resolve("mem", f"m{i}") for i in range(n)]
    proc = psutil.Process()
    before_bytes, before_rss = engine.cache.nbytes, proc.memory_info().rss
    for r in resolved:
        engine.acquire(r)
    tensor_bytes = (engine.cache.nbytes - before_bytes) / n
    rss_bytes = max(0, proc.memory_info().rss - before_rss) / n
    per = max(tensor_bytes, rss_bytes)
    return {"bytes_per_adapter": {"tensors": tensor_bytes, "rss": rss_bytes},
            "resident_adapters_per_gib": (1 << 30) / per}


if __name__ == "__main__":
    main()
