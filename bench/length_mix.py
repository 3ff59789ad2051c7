"""What an adapter's ``max_length`` costs the mixed batches its rows join.

    python -m bench.length_mix [--quick] [--threads N] --out bench/results/length-mix-cpu.json

A mixed batch is padded to its longest row, and each row is cut to its own adapter's
``max_length`` (``TextServing.collate``). So a tenant whose adapter was trained at 256 tokens on
long texts makes every batch its rows join up to as dear as a batch of 256-token rows. This
measures that on the real path (``Engine.predict_rows``: collate, one forward, labels) with the
bundled MiniLM and real texts: short tweets (``bench.data`` "tweets") and long film reviews
("imdb"), ``ROWS`` rows a batch, r=8 adapters on query/value. Cases, timed interleaved (machine
noise hits them alike) and reported as paired ratios against ``short``:

* ``short``: every row a tweet, its adapter at 128 tokens (the status quo of short-text tenants);
* ``mixed@128`` / ``mixed@256``: one review among the tweets, its adapter at 128 / 256 tokens;
* ``quarter@128`` / ``quarter@256``: a quarter of the rows reviews;
* ``long@128`` / ``long@256``: every row a review.

Also recorded per case: the padded width, the real (unpadded) tokens and the share of the
batch's token slots that are padding.
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
    turn) through ``Engine.predict_rows``, interleaved over ``rounds`` rounds."""
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    catalog.registry.create_tenant("bench", quotas={"max_adapters": 100, "max_storage_bytes": 1 << 34})
    engine = Engine(base, catalog, EngineConfig(device_slots=ROWS + 1, max_batch_size=ROWS))

    def adapter(name: str, seed: int, max_length: int) -> Any:
        art = random_artifact(base.spec, r=8, targets=("query", "value"), n_labels=2, seed=seed)
        art = AdapterArtifact(manifest=replace(art.manifest, max_length=max_length), weights=art.weights)
        catalog.publish("bench", name, art, promote=True)
        return engine.acquire(engine.resolve("bench", name))

    short = adapter("short", 0, 128)
    long_at = {n: adapter(f"long{n}", 1, n) for n in LENGTHS}
    batches: dict[str, tuple[list[str], list[Any]]] = {}
    shapes: dict[str, dict[str, Any]] = {}
    for case, (k, n) in CASES.items():
        texts = [long_texts[i % len(long_texts)] if i < k else short_texts[i % len(short_texts)] for i in range(ROWS)]
        rows = [long_at[n] if i < k else short for i in range(ROWS)]
        batches[case] = (texts, rows)
        mask = engine.serving.collate(texts, rows)["attention_mask"]
        shapes[case] = {"reviews": k, "adapter_length": n, "width": int(mask.shape[1]),
                        "real_tokens": int(mask.sum()), "padding_share": round(1 - float(mask.float().mean()), 4)}
    for texts, rows in batches.values():  # every case answers before anything is timed
        preds = engine.predict_rows(texts, rows)
        if any(p is None or not hasattr(p, "label") for p in preds):
            raise RuntimeError(f"a row got no prediction: {preds}")
    cpu = torch.get_num_threads() == 1 and base.device.type == "cpu"
    times = interleaved({case: (lambda t=t, r=r: engine.predict_rows(t, r)) for case, (t, r) in batches.items()},
                        rounds=rounds, clock=time.thread_time if cpu else time.perf_counter)
    cases = {case: {**shapes[case], "median_s": median(ts), "rows_per_s": ROWS / median(ts),
                    "ratio_vs_short": median([t / s for t, s in zip(ts, times["short"])])}
             for case, ts in times.items()}
    paired = {f"{name}@256_vs_@128": median([a / b for a, b in zip(times[f"{name}@256"], times[f"{name}@128"])])
              for name in ("mixed", "quarter", "long")}
    return {"rows": ROWS, "rounds": rounds, "base": base.spec.name, "clock": "thread CPU time" if cpu else "wall",
            "cases": cases, "paired": paired}


def plot(png: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(cases)
    ax.bar(names, [cases[c]["ratio_vs_short"] for c in names], color=["C0" if "256" not in c else "C3" for c in names])
    for i, c in enumerate(names):
        ax.annotate(f"{cases[c]['width']} tok", (i, cases[c]["ratio_vs_short"]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("batch time / all-short batch time (paired)")
    ax.set_title(f"{result['rows']}-row mixed batches: one adapter's max_length (reviews among tweets)")
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=20)
    save_figure(fig, png)


if __name__ == "__main__":
    main()
