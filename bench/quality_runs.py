"""bench.quality's runs, kept per (method, seed): their summaries, merging pieces, resuming.

A text result of ``bench.quality`` holds, for each trained method (``lora``, ``head``, ``full``,
``lora:NAME`` variants), one record per training seed under ``runs`` (accuracy, macro_f1,
train_seconds, ... or ``failed`` with the reason) and the summary over them
(``method_summary``: means, the accuracy's standard deviation, trainable parameters).

Pieces of one comparison -- one method x seed per process, on one machine or several -- merge
into one result, and a run that stopped (a crash, a deadline) resumes from the JSON it wrote
after each finished run: both go through ``take_runs(result, curves, other, source)``, which
copies every run of ``other`` whose (method, seed) ``result`` still lacks, each marked with
where it came from (``from_run``: file, when, load average), and recomputes the summaries.
It first checks that ``other`` is the same comparison (``COMPARABLE``: data set, split sizes,
pooling, max length, common hyper-parameters; a variant of the same name must have the same
settings) and refuses it otherwise (``SystemExit`` naming the file and the field). TF-IDF is
deterministic and taken whole. Files are written atomically (``save``): a crash never leaves
half a JSON for the next resume to choke on.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPARABLE = ("dataset", "n_train", "n_validation", "n_test", "pooling", "max_length", "input_size",
              "hyperparameters")
Piece = tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]  # run, META fields, curve
META = ("trainable_params", "total_params", "trainable_fraction", "trainable_vs_backbone", "hyperparameters")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the seeds' runs (``accuracy_std``: 0 for one run)."""
    acc = [r["accuracy"] for r in runs]
    return {"accuracy": statistics.mean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "macro_f1": statistics.mean(r["macro_f1"] for r in runs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs), "n_seeds": len(runs)}


def method_summary(runs: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """A method's entry: the summary over its successful runs (a failed run is left out of the
    means and counted in ``n_failed``), ``meta`` (``META``'s fields), the runs by seed."""
    runs = sorted(runs, key=lambda r: r["seed"])
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return {"accuracy": None, "failed": runs[0]["failed"], "n_failed": len(runs), **meta, "runs": runs}
    return {**summarise(ok), "n_failed": len(runs) - len(ok), **meta, "runs": runs}


def trained_meta(res: Any) -> dict[str, Any]:
    """A ``TrainResult``'s ``META`` fields (the trainable share, the values it used)."""
    return {"trainable_params": res.trainable_params, "total_params": res.total_params,
            "trainable_fraction": res.trainable_params / res.total_params, "hyperparameters": res.hyperparameters}


def trained_methods(result: dict[str, Any]) -> list[str]:
    return [k for k, v in result.items() if isinstance(v, dict) and isinstance(v.get("runs"), list)]


def done(result: dict[str, Any], method: str) -> set[int]:
    """The seeds ``method`` has a run for in ``result``."""
    entry = result.get(method)
    return {r["seed"] for r in entry["runs"]} if isinstance(entry, dict) and "runs" in entry else set()


def take_runs(result: dict[str, Any], curves: dict[str, Any], other: dict[str, Any], source: str) -> list[str]:
    """Copy into ``result`` (and ``curves``) what ``other`` has that it lacks (see the module
    docstring); returns the ``method:seed`` pieces taken."""
    for key in COMPARABLE:
        if other.get(key) != result.get(key):
            raise SystemExit(f"{source}: {key} is {other.get(key)!r} there but {result.get(key)!r} in this run; "
                             "not the same comparison, so it cannot be merged")
    variants = result.setdefault("variants", {})
    for name, settings in (other.get("variants") or {}).items():
        if variants.setdefault(name, settings) != settings:
            raise SystemExit(f"{source}: variant {name!r} is {settings!r} there but {variants[name]!r} here")
    mark = {"file": Path(source).name, "when": (other.get("machine") or {}).get("when"),
            "load_average": (other.get("machine") or {}).get("load_average")}
    taken: list[str] = []
    for method in trained_methods(other):
        have = done(result, method)
        new = [{**r, "from_run": r.get("from_run", mark)} for r in other[method]["runs"] if r["seed"] not in have]
        if not new:
            continue
        mine = result.get(method) or {}
        meta = {k: mine.get(k, other[method].get(k)) for k in META if k in mine or k in other[method]}
        result[method] = method_summary(list(mine.get("runs", [])) + new, meta)
        if method not in curves and (other.get("curves") or {}).get(method):
            curves[method] = other["curves"][method]
        taken += [f"{method}:{r['seed']}" for r in new]
    if "tfidf" in other and "tfidf" not in result:
        result["tfidf"] = {**other["tfidf"], "from_run": other["tfidf"].get("from_run", mark)}
        taken.append("tfidf")
    return taken


def train_pending(out: Path, result: dict[str, Any], curves: dict[str, Any], methods: list[str],
                  seed_list: list[int], train_one: Callable[[str, int], Piece]) -> None:
    """Train every (seed, method) of ``seed_list`` x ``methods`` that ``result`` lacks, seeds outer
    and methods interleaved inside (machine load drifts hit every method alike), each with
    ``train_one(method, seed)`` -> ``(its run record, its META fields or None when it failed, its
    curve)``. ``out`` is written before the first run and after every run, ``result[method]``
    summarised again and ``result["pending"]`` listing what is left (a crash keeps the finished
    runs)."""
    from bench.common import machine

    pending = [(seed, method) for seed in seed_list for method in methods if seed not in done(result, method)]
    result["pending"] = [f"{method}:{seed}" for seed, method in pending]
    if pending:  # what is to come is on disk before the first (maybe hours-long) run
        save(out, {**result, "machine": machine(), "curves": curves})
    for seed, method in pending:
        run, meta, history = train_one(method, seed)
        mine = result.get(method) or {}
        if meta is None:  # a failed run: keep what an earlier run of the method said
            meta = {k: mine[k] for k in META if k in mine}
        result[method] = method_summary(list(mine.get("runs", [])) + [run], meta)
        if method not in curves or seed == min(seed_list):
            curves[method] = history
        result["pending"].remove(f"{method}:{seed}")
        save(out, {**result, "machine": machine(), "curves": curves})


def save(out: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``out`` atomically (a temporary file beside it, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
