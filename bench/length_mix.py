"""What an adapter's ``max_length`` costs the mixed batches its rows join.

    python -m bench.length_mix [--quick] [--threads N] --out bench/results/length-mix-cpu.json

A mixed batch is padded to its longest row, and each row is cut to its own adapter's
``max_length`` (``TextServing.collate``). So a tenant whose adapter was trained at 256 tokens on
long texts could make every batch its rows join as dear as a batch of 256-token rows. This
measures that on the real path (``Engine.predict_rows``: collate, forward passes, labels) with the
bundled MiniLM and real texts: short tweets (``bench.data`` "tweets") and long film reviews
("imdb"), ``ROWS`` rows a batch, r=8 adapters on query/value. Cases, timed interleaved (machine
noise hits them alike) and reported as paired ratios against ``short``:

* ``short``: every row a tweet, its adapter at 128 tokens (the status quo of short-text tenants);
* ``mixed@128`` / ``mixed@256``: one review among the tweets, its adapter at 128 / 256 tokens;
* ``quarter@128`` / ``quarter@256``: a quarter of the rows reviews;
* ``long@128`` / ``long@256``: every row a review.

Each case runs two ways, interleaved: ``one_pass`` (``split_cost_tokens=0``: the batch in one
forward pass, every row padded to the widest) and ``split`` (the engine's default on a CPU:
passes of rows of similar width, ``adapters.runtime.width_groups``). Also recorded per case: the
padded width, the real (unpadded) tokens, the share of the batch's token slots that are padding
and the passes the split runs (rows, width).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from adapters.artifact import AdapterArtifact
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.width_groups import width_groups
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from bench import data
from bench.common import interleaved, machine, median, parser, save_figure, write

ROWS = 32
LENGTHS = (128, 256)
# case -> (reviews among the ROWS rows, the reviews' adapter length)
CASES: dict[str, tuple[int, int]] = {
    "short": (0, 128), **{f"{name}@{n}": (k, n) for name, k in (("mixed", 1), ("quarter", ROWS // 4), ("long", ROWS))
                          for n in LENGTHS},
}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: then each call's CPU time is what is timed, which other "
                        "processes on a shared machine do not inflate; more: wall time)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from adapters.base import load_base

    base = load_base(max_length=max(LENGTHS))
    tweets = [r["text"] for r in data.load("tweets")[:ROWS]]
    reviews = [r["text"] for r in data.load("imdb")[:ROWS]]
    with tempfile.TemporaryDirectory(prefix="tailor-bench-") as tmp:
        result = measure(base, tweets, reviews, Path(tmp), rounds=5 if args.quick else 15)
    result.update(machine=machine(), quick=args.quick, threads=torch.get_num_threads())
    write(args.out, result)
    plot(args.out.with_suffix(".png"), result)


def measure(base: Any, short_texts: list[str], long_texts: list[str], tmp: Path, *, rounds: int) -> dict[str, Any]:
    """Time every case of ``CASES`` (``ROWS`` rows each: ``short_texts`` and ``long_texts`` in
    turn) through ``Engine.predict_rows``, interleaved over ``rounds`` rounds, twice: ``one_pass``
    (``split_cost_tokens=0``: the whole batch in one forward pass, padded to its widest row) and
    ``split`` (the engine's default: passes of similar width, ``runtime.width_groups``)."""
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    catalog.registry.create_tenant("bench", quotas={"max_adapters": 100, "max_storage_bytes": 1 << 34})
    for name, seed, n in (("short", 0, 128), *((f"long{n}", 1, n) for n in LENGTHS)):
        art = random_artifact(base.spec, r=8, targets=("query", "value"), n_labels=2, seed=seed)
        catalog.publish("bench", name, AdapterArtifact(manifest=replace(art.manifest, max_length=n), weights=art.weights),
                        promote=True)
    engines = {mode: Engine(base, catalog, EngineConfig(device_slots=ROWS + 1, max_batch_size=ROWS, **extra))
               for mode, extra in (("one_pass", {"split_cost_tokens": 0}), ("split", {}))}
    calls: dict[str, Any] = {}
    shapes: dict[str, dict[str, Any]] = {}
    for mode, engine in engines.items():
        short = engine.acquire(engine.resolve("bench", "short"))
        long_at = {n: engine.acquire(engine.resolve("bench", f"long{n}")) for n in LENGTHS}
        for case, (k, n) in CASES.items():
            texts = [long_texts[i % len(long_texts)] if i < k else short_texts[i % len(short_texts)] for i in range(ROWS)]
            rows = [long_at[n] if i < k else short for i in range(ROWS)]
            preds = engine.predict_rows(texts, rows)  # every case answers before anything is timed
            if not all(hasattr(p, "label") for p in preds):
                raise RuntimeError(f"{mode} {case}: a row got no prediction: {preds}")
            calls[f"{mode}/{case}"] = lambda e=engine, t=texts, r=rows: e.predict_rows(t, r)
            if mode == "split":
                batch = engine.serving.collate(texts, rows)
                mask = batch["attention_mask"]
                widths = engine.serving.widths(batch)
                passes = width_groups(widths, engine.split_cost)
                shapes[case] = {"reviews": k, "adapter_length": n, "width": int(mask.shape[1]),
                                "real_tokens": int(mask.sum()), "padding_share": round(1 - float(mask.float().mean()), 4),
                                "split_passes": [[len(g), max(widths[i] for i in g)] for g in passes]}
    cpu = torch.get_num_threads() == 1 and base.device.type == "cpu"
    times = interleaved(calls, rounds=rounds, clock=time.thread_time if cpu else time.perf_counter)
    ref = times["one_pass/short"]
    cases = {}
    for case in CASES:
        one, split = times[f"one_pass/{case}"], times[f"split/{case}"]
        cases[case] = {**shapes[case], "one_pass_median_s": median(one), "split_median_s": median(split),
                       "one_pass_vs_short": median([t / s for t, s in zip(one, ref)]),
                       "split_vs_short": median([t / s for t, s in zip(split, ref)]),
                       "split_vs_one_pass": median([a / b for a, b in zip(split, one)])}
    paired = {f"{mode}/{name}@256_vs_@128": median([a / b for a, b in zip(times[f"{mode}/{name}@256"],
                                                                         times[f"{mode}/{name}@128"])])
              for mode in engines for name in ("mixed", "quarter", "long")}
    return {"rows": ROWS, "rounds": rounds, "base": base.spec.name, "clock": "thread CPU time" if cpu else "wall",
            "split_cost_tokens": engines["split"].split_cost, "cases": cases, "paired": paired}


def plot(png: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    names = list(cases)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(names))
    for dx, mode, color in ((-0.2, "one_pass", "C3"), (0.2, "split", "C0")):
        ax.bar([x + dx for x in xs], [cases[c][f"{mode}_vs_short"] for c in names], width=0.4, color=color,
               label={"one_pass": "one pass (padded to the widest row)", "split": "passes of similar width"}[mode])
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("batch time / all-tweets batch (paired)")
    ax.set_title(f"{result['rows']}-row batches of tweets with film reviews among them (MiniLM)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, png)


if __name__ == "__main__":
    main()
