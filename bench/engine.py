"""Engine benchmark: mixed-tenant batches on the real MiniLM base against peft and the base alone.

    python -m bench.engine [--quick] --out bench/results/engine-cpu.json

Methods, timed interleaved in one process so machine noise hits them alike:
``base`` (the plain model, no adapters: the upper bound), ``tailor`` (our engine),
``peft_mixed`` (peft's ``adapter_names=`` mixed batch) and ``naive_swap`` (peft ``set_adapter``
and one request at a time). A batch holds ``max(32, k)`` rows of 64 tokens naming ``k``
distinct r=8 query/value adapters. Also measured: cold-load latency from a store holding
10,000 registered adapters (500 with --quick), and host bytes per resident adapter.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from peft import PeftModel
from tqdm import tqdm

from adapters.base import load_base
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


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    rounds = 7 if args.quick else 21
    n_registered = 500 if args.quick else 10_000
    with tempfile.TemporaryDirectory(prefix="tailor-bench-") as tmp:
        result = run(Path(tmp), rounds=rounds, n_registered=n_registered)
    result["quick"] = args.quick
    write(args.out, result)
    plot_lines(
        args.out.with_suffix(".png"), "Mixed-tenant throughput (MiniLM, r=8 q/v, 64 tokens)",
        "distinct adapters in the batch", "rows / s",
        {m: {k: result["rows_per_s"][m][str(k)] for k in COUNTS} for m in result["rows_per_s"]},
        logx=True,
    )


def run(tmp: Path, *, rounds: int, n_registered: int) -> dict[str, Any]:
    base = load_base()
    device = base.device
    pristine = copy.deepcopy(base.model)  # the engine wraps base.model in place
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    engine = Engine(base, catalog, EngineConfig(device_slots=129, max_batch_size=128))
    for tenant in ["bench", "mem", *(f"t{i}" for i in range(100))]:  # "mem" holds 400 adapters
        catalog.registry.create_tenant(tenant, quotas={"max_adapters": 100_000})

    arts = [random_artifact(base.spec, r=8, targets=("query", "value"), n_labels=2, seed=i)
            for i in range(max(COUNTS))]
    records = [catalog.publish("bench", f"a{i}", a, promote=True) for i, a in enumerate(arts)]
    loaded = [engine.acquire(engine.resolve("bench", f"a{i}")) for i in range(len(arts))]
    peft_model = build_peft(pristine, arts, base.spec, tmp / "peft").to(device)

    rows_per_s: dict[str, dict[str, float]] = {m: {} for m in ("base", "tailor", "peft_mixed", "naive_swap")}
    max_diff = 0.0
    for k in tqdm(COUNTS, desc="throughput"):
        n = max(BASE_ROWS, k)
        ids = torch.randint(1000, 20000, (n, TOKENS), device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        names = [f"a{i % k}" for i in range(n)]
        rows = [loaded[i % k] for i in range(n)]

        def run_base() -> Any:
            with torch.inference_mode():
                return pristine(**inputs).logits

        def run_tailor() -> Any:
            return engine.forward(inputs, rows)

        def run_peft() -> Any:
            with torch.inference_mode():
                return peft_model(**inputs, adapter_names=names).logits

        def run_naive() -> Any:
            with torch.inference_mode():
                for i, name in enumerate(names):
                    peft_model.set_adapter(name)
                    peft_model(input_ids=ids[i : i + 1], attention_mask=inputs["attention_mask"][i : i + 1])

        ours = torch.stack([t for t in run_tailor().logits])
        max_diff = max(max_diff, (ours.float() - run_peft().float()).abs().max().item())
        times = interleaved({"base": run_base, "tailor": run_tailor, "peft_mixed": run_peft,
                             "naive_swap": run_naive}, rounds=rounds)
        for m, ts in times.items():
            rows_per_s[m][str(k)] = n / median(ts)

    t = rows_per_s["tailor"]
    ratios = {f"ratio_vs_{m}": {k: t[k] / rows_per_s[m][k] for k in t} for m in ("base", "peft_mixed", "naive_swap")}
    cold = cold_loads(engine, catalog, base.spec, n_registered)
    per_adapter = memory_per_adapter(engine, catalog, base.spec, tmp)
    return {
        "machine": machine(), "device": str(device), "dtype": str(base.dtype).replace("torch.", ""),
        "batch": {"rows": {str(k): max(BASE_ROWS, k) for k in COUNTS}, "tokens": TOKENS,
                  "rank": 8, "targets": ["query", "value"], "rounds": rounds, "statistic": "median"},
        "rows_per_s": rows_per_s, **ratios,
        "max_abs_diff_vs_peft": max_diff,
        "cold_load_ms": cold,
        **per_adapter,
        "adapter_file_bytes": records[0].nbytes,
    }


def build_peft(pristine: torch.nn.Module, arts: list, spec, folder: Path) -> PeftModel:
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


def cold_loads(engine: Engine, catalog: Catalog, spec, n_registered: int, n_samples: int = 300) -> dict[str, Any]:
    """Register ``n_registered`` adapters, then time first loads of a random sample of them."""
    t0 = time.perf_counter()
    for i in tqdm(range(n_registered), desc="registering"):
        art = random_artifact(spec, r=8, targets=("query", "value"), n_labels=2, seed=100_000 + i)
        catalog.publish(f"t{i % 100}", f"cold{i}", art, promote=True)
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


def memory_per_adapter(engine: Engine, catalog: Catalog, spec, tmp: Path, n: int = 400) -> dict[str, Any]:
    """Host bytes per resident adapter: tensor bytes, and the process RSS growth per adapter."""
    for i in range(n):
        catalog.publish("mem", f"m{i}", random_artifact(spec, r=8, targets=("query", "value"), seed=900_000 + i),
                        promote=True)
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
