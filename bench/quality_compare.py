"""Two methods of ``bench.quality`` side by side over several data sets, and the rule that decides.

    python -m bench.quality_compare --a lora --b lora:head10 FILE.json [FILE.json ...] --out OUT.json
        [--earlier '{"tweets": {"lora:head10": {"0": 0.6318}}}' --earlier-source FILE]

Reads one ``bench.quality`` result per data set (each with both methods, several seeds; runs
measured earlier with the same code and settings can be added with ``--earlier``, marked with
``--earlier-source``) and writes, per set, over the seeds both methods ran (paired; a seed only
one method has is listed under ``unpaired_seeds`` and left out): each method's mean test
accuracy, its standard deviation over the seeds and standard error (std / sqrt(seeds)), mean
train seconds and trainable parameters, the per-seed differences ``b - a`` and their mean; then
the verdict of the rule for
changing a default to ``b`` (``verdict``): ``b``'s mean beats ``a``'s on every set, or on
average over the sets with no set where ``b`` loses more than ``a``'s standard error there. A
seed that failed (``TrainingDiverged``) is left out of the means, as ``bench.quality`` does, and
listed under ``failed``; a set where either method has no successful run makes the verdict
"undecided" (no change). A PNG of the means with their standard
errors goes next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.common import machine, save_figure
from bench.quality_runs import save


def side(entry: dict[str, Any], seeds: set[int]) -> dict[str, Any]:
    """One method on one set: its runs of ``seeds`` summarised (a failed run left out of the means)."""
    runs = [r for r in entry.get("runs", []) if r["seed"] in seeds]
    acc = [r["accuracy"] for r in runs if "failed" not in r]
    std = statistics.stdev(acc) if len(acc) > 1 else 0.0
    timed = [r["train_seconds"] for r in runs if r.get("train_seconds") is not None]
    return {"accuracy": statistics.mean(acc) if acc else None, "accuracy_std": std,
            "accuracy_stderr": std / math.sqrt(len(acc)) if acc else None, "seeds": [r["seed"] for r in runs],
            "accuracies": {r["seed"]: r.get("accuracy") for r in runs},
            "failed": [r["seed"] for r in runs if "failed" in r],
            "train_seconds": statistics.mean(timed) if timed else None,
            "trainable_params": entry.get("trainable_params"),
            "sources": sorted({(r.get("from_run") or {}).get("file", "this run") for r in runs})}


def seeds_of(entry: dict[str, Any]) -> set[int]:
    return {r["seed"] for r in entry.get("runs", [])}


def compare(results: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    for res in results:
        ea, eb = res.get(a, {}), res.get(b, {})
        both = seeds_of(ea) & seeds_of(eb)
        sa, sb = side(ea, both), side(eb, both)
        paired = [sb["accuracies"][s] - sa["accuracies"][s] for s in sorted(both)
                  if sa["accuracies"][s] is not None and sb["accuracies"][s] is not None]
        diff = sb["accuracy"] - sa["accuracy"] if None not in (sa["accuracy"], sb["accuracy"]) else None
        sets[res["dataset"]] = {a: sa, b: sb, "b_minus_a_points": None if diff is None else 100 * diff,
                                "paired_b_minus_a_points": [100 * d for d in paired],
                                "unpaired_seeds": {m: sorted(seeds_of(e) - both) for m, e in ((a, ea), (b, eb))},
                                "n_train": res.get("n_train"), "n_test": res.get("n_test"), "quick": res.get("quick"),
                                "load_average": (res.get("machine") or {}).get("load_average")}
    return {"a": a, "b": b, "sets": sets, "verdict": verdict(sets, a)}


def add_earlier(results: list[dict[str, Any]], earlier: dict[str, Any], source: str) -> None:
    """Add runs measured before (``{dataset: {method: {seed: accuracy or null for failed}}}``) to
    the results of their data sets, each marked ``from_run: {"file": source}``; a seed a result
    already has is an error (it was measured twice: use the file's)."""
    by_name = {r["dataset"]: r for r in results}
    for dataset, methods in earlier.items():
        res = by_name.get(dataset)
        if res is None:
            raise SystemExit(f"--earlier names data set {dataset!r}, which no file holds")
        for method, seeds in methods.items():
            entry = res.setdefault(method, {"runs": []})
            for seed, acc in seeds.items():
                if int(seed) in seeds_of(entry):
                    raise SystemExit(f"--earlier: {dataset} {method} seed {seed} is already in a file")
                run = {"seed": int(seed), "accuracy": acc, "train_seconds": None, "from_run": {"file": source}}
                entry["runs"].append(run if acc is not None else {**run, "failed": f"failed in {source}"})


def verdict(sets: dict[str, Any], a: str) -> dict[str, Any]:
    diffs = {name: s["b_minus_a_points"] for name, s in sets.items()}
    if not diffs or any(d is None for d in diffs.values()):
        return {"change": False, "why": "undecided: a set lacks a successful run of one method", "diffs": diffs}
    worse = {n: d for n, d in diffs.items() if d < -100 * (sets[n][a]["accuracy_stderr"] or 0.0)}
    mean = statistics.mean(diffs.values())
    if all(d > 0 for d in diffs.values()):
        return {"change": True, "why": "b's mean beats a's on every set", "mean_points": mean, "diffs": diffs}
    if mean > 0 and not worse:
        return {"change": True, "why": "b is better on average and loses on no set by more than a's standard error",
                "mean_points": mean, "diffs": diffs}
    why = (f"b loses more than a's standard error on {', '.join(worse)}" if worse
           else f"b is not better on average ({mean:+.2f} points)")
    return {"change": False, "why": why, "mean_points": mean, "diffs": diffs}


def plot(png: Path, table: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["sets"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
    for k, method in enumerate((table["a"], table["b"])):
        means = [table["sets"][n][method]["accuracy"] or 0.0 for n in names]
        errs = [table["sets"][n][method]["accuracy_stderr"] or 0.0 for n in names]
        ax.bar([i + 0.38 * k for i in range(len(names))], means, 0.36, yerr=errs, capsize=4, label=method)
    ax.set_xticks([i + 0.19 for i in range(len(names))], names)
    ax.set(ylabel="test accuracy (mean over seeds, +- standard error)", ylim=(0.4, 1.0),
           title=f"{table['b']} vs {table['a']}: {'change' if table['verdict']['change'] else 'keep'}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--a", required=True, help="the current default's method name, e.g. lora")
    p.add_argument("--b", required=True, help="the candidate's, e.g. lora:head10")
    p.add_argument("--note", default="", help="what the reader must know (sizes, epochs, machine)")
    p.add_argument("--earlier", type=json.loads, default={},
                   help='JSON {dataset: {method: {seed: accuracy, or null if it failed}}} measured before')
    p.add_argument("--earlier-source", default="earlier run", help="where --earlier's figures come from")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    results = [json.loads(f.read_text()) for f in args.files]
    add_earlier(results, args.earlier, args.earlier_source)
    table = {"note": args.note, "machine": machine(), "files": [f.name for f in args.files],
             **compare(results, args.a, args.b)}
    save(args.out, table)
    plot(args.out.with_suffix(".png"), table)
    print(json.dumps(table["verdict"], indent=1))


if __name__ == "__main__":
    main()
