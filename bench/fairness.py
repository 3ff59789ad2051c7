"""Fairness benchmark: how long a small job waits for the worker behind another tenant's long job.

    python -m bench.fairness [--quick] --out bench/results/fairness-cpu-quick.json

One real training worker process (the CPU default: one worker, one torch thread) on the
bundled MiniLM and a SQLite registry. Tenant ``big`` submits a long LoRA job; while it trains,
tenant ``small`` submits a 36-row job at several points of the long job (a new one after each
finishes). Measured per small job: the time from its submit to ``running``, in seconds and as
a fraction of the long job's epoch time, and how the long job gave way (after an epoch, or
mid-epoch once its turn passed the slice). Then the same first submit against a worker started
with ``--no-yield`` (first come, first served, as before fair sharing): the small job waits for
the long job to end. The long job must still succeed with every epoch trained once.

Targets: every wait within one epoch of the long job and under 2 minutes. Quick mode uses a
300-row long job and a 30 s slice (mid-epoch yields show up within a few minutes); the full run
uses an 1,800-row long job, as in the report that asked for this, and the defaults (a 30 s
minimum turn, a 60 s slice). Also reported: how often the long job yielded and what each switch
back cost (claim to training resumed).
Texts are synthetic reviews of realistic length (the data's content does not matter here, its
size does). A PNG shows both runs as timelines.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.datasets import from_records
from adapters.jobs.manager import JobManager
from adapters.registry import Registry
from adapters.store import LocalStore
from bench.common import machine, parser, save_figure, write

POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "delightful", "sharp", "warm", "gripping"]
NEGATIVE = ["dull", "awful", "clumsy", "tedious", "weak", "lifeless", "muddled", "flat", "grating"]
FILLER = ("the film story cast plot director scene music pace ending actor camera script it was and "
          "with a of to in that this but its every some more than quite really").split()
SMALL_ROWS = 36
TARGET_WAIT_S = 120.0


@dataclass(frozen=True)
class Setup:
    long_rows: int
    long_epochs: int
    min_turn_seconds: float
    slice_seconds: float
    submit_at: tuple[float, ...]  # fractions of the long job's steps at which a small job is submitted
    max_length: int = 64
    batch_size: int = 16
    threads: int = 1


QUICK = Setup(long_rows=300, long_epochs=3, min_turn_seconds=30.0, slice_seconds=30.0, submit_at=(0.1, 0.45, 0.8))
FULL = Setup(long_rows=1800, long_epochs=3, min_turn_seconds=30.0, slice_seconds=60.0,
             submit_at=(0.05, 0.3, 0.55, 0.8))


def reviews(n: int, seed: int) -> list[dict[str, str]]:
    """Synthetic labelled reviews of 40-70 words; the label's words are scattered among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.choices(FILLER, k=rng.randint(34, 60)) + rng.choices(
            POSITIVE if label == "positive" else NEGATIVE, k=rng.randint(3, 8))
        rng.shuffle(words)
        rows.append({"text": f"review {seed}-{i}: " + " ".join(words), "label": label})
    return rows


@dataclass
class Run:
    """One worker process and what happened while it ran."""

    fair: bool
    t0: float = field(default_factory=time.time)
    samples: list[dict[str, Any]] = field(default_factory=list)
    long_job: dict[str, Any] = field(default_factory=dict)
    segments: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # job -> [(start, end)]
    submits: list[float] = field(default_factory=list)


def start_worker(home: Path, setup: Setup, fair: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "adapters.jobs.worker", "--database-url", f"sqlite:///{home / 'tailor.db'}",
           "--store-url", str(home / "store"), "--checkpoints", str(home / "checkpoints"),
           "--threads", str(setup.threads), "--poll-seconds", "0.5", "--nice", "0",
           "--yield-min-turn-seconds", str(setup.min_turn_seconds), "--yield-slice-seconds", str(setup.slice_seconds)]
    if not fair:
        cmd.append("--no-yield")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, env=env, stdout=open(home / "worker.log", "ab"), stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(what: str, predicate: Any, timeout: float, proc: subprocess.Popen[bytes], home: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited while waiting for {what}:\n{(home / 'worker.log').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def scenario(home: Path, setup: Setup, *, fair: bool, submit_at: tuple[float, ...]) -> Run:
    """A long job of ``big``, and a small job of ``small`` submitted at each of ``submit_at``."""
    home.mkdir(parents=True)
    reg = Registry(f"sqlite:///{home / 'tailor.db'}")
    for tenant in ("big", "small"):
        reg.create_tenant(tenant, quotas={"max_active_jobs": 10})
    jm = JobManager(reg.engine, LocalStore(home / "store"))
    hp = {"batch_size": setup.batch_size, "max_length": setup.max_length, "learning_rate": 1e-3}
    long_hp = {**hp, "epochs": setup.long_epochs, "patience": setup.long_epochs}
    proc = start_worker(home, setup, fair)
    run = Run(fair=fair)
    try:
        long = jm.submit("big", "long", training=from_records(reviews(setup.long_rows, seed=1)),
                         hyperparameters=long_hp)
        for k, fraction in enumerate(submit_at):
            def reached(f: float = fraction) -> bool:
                job = jm.get("big", long.id)
                return job.status == "running" and job.progress.get("fraction", 0.0) >= f

            wait_for(f"the long job at {fraction:.0%}", reached, 3600, proc, home)
            t_submit = time.time()
            small = jm.submit("small", f"quick{k}", training=from_records(reviews(SMALL_ROWS, seed=100 + k)),
                              hyperparameters={**hp, "epochs": 3})
            run.submits.append(t_submit - run.t0)
            wait_for("the small job to run", lambda: jm.get("small", small.id).status in ("running", "succeeded",
                                                                                           "failed"), 3600, proc, home)
            waited = time.time() - t_submit
            wait_for("the small job to end", lambda: jm.get("small", small.id).status in ("succeeded", "failed"),
                     3600, proc, home)
            run.samples.append({"submitted_at_fraction": fraction, "wait_seconds": round(waited, 2),
                                "small_job": jm.get("small", small.id).status})
            if not fair:
                break  # first come, first served: the small job ran after the long one ended
        wait_for("the long job to end", lambda: jm.get("big", long.id).status in ("succeeded", "failed", "cancelled"),
                 7200, proc, home)
    finally:
        stop_worker(proc)
    describe(run, jm, long.id)
    return run


def describe(run: Run, jm: JobManager, long_id: str) -> None:
    """The long job's epochs and yields, and every job's time on the worker, from the events."""
    long = jm.get("big", long_id)
    events = jm.events("big", long_id)
    rel = lambda at: at.timestamp() - run.t0  # noqa: E731
    epoch_ends = [(e.data["epoch"], rel(e.at)) for e in events
                  if e.type == "metrics" and e.data and "val_accuracy" in e.data]
    starts = [rel(e.at) for e in events if e.message.startswith("training ")]
    yields = [e for e in events if e.message.startswith("yielded the worker")]
    # epoch time: epochs run in one piece -- from the previous epoch's end in the same turn, or
    # for epoch 1 from the first start (tokenising included) -- validation included
    pieces: list[float] = []
    marks = sorted([(t, "start") for t in starts] + [(t, "epoch") for _, t in epoch_ends]
                   + [(rel(e.at), "yield") for e in yields])
    for i, ((t_a, kind_a), (t_b, kind_b)) in enumerate(zip(marks, marks[1:])):
        if kind_b == "epoch" and (kind_a == "epoch" or (kind_a == "start" and i == 0)):
            pieces.append(t_b - t_a)
    run.long_job = {
        "status": long.status, "epochs_run": long.metrics.get("epochs_run"),
        "epochs_trained": [n for n, _ in epoch_ends], "val_accuracy": long.metrics.get("val_accuracy"),
        "epoch_seconds_uninterrupted": [round(x, 2) for x in pieces],
        "wall_seconds": round((long.finished_at - long.created_at).total_seconds(), 1) if long.finished_at else None,
        "yields": [e.message.split("; it resumes from its checkpoint ")[-1] for e in yields],
        "resumes": [e.message for e in events if e.message.startswith("resumed from the checkpoint")],
        "resume_seconds": resume_costs(events),
        "attempts": long.attempts,
    }
    for tenant in ("big", "small"):
        for job in jm.list(tenant, limit=100):
            segs, start = [], None
            for e in jm.events(tenant, job.id):
                if e.message.startswith("picked up by worker"):
                    start = rel(e.at)
                elif start is not None and (e.message.startswith("yielded the worker")
                                            or e.message.startswith("job ")):
                    segs.append((start, rel(e.at)))
                    start = None
            run.segments[f"{tenant}:{job.adapter}"] = segs


def resume_costs(events: list[Any]) -> list[float]:
    """The cost of each switch back: from a claim after a yield to training resumed (data read
    again, tokenised, model copied, checkpoint loaded)."""
    costs, claimed, yielded = [], None, False
    for e in events:
        if e.message.startswith("yielded the worker"):
            yielded = True
        elif e.message.startswith("picked up by worker") and yielded:
            claimed = e.at
        elif e.message.startswith("resumed from the checkpoint") and claimed is not None:
            costs.append(round((e.at - claimed).total_seconds(), 2))
            claimed = None
    return costs


def plot(png: Path, runs: dict[str, Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.2 + 1.3 * len(runs)), squeeze=False)
    for ax, (title, run) in zip(axes[:, 0], runs.items()):
        names = sorted(run.segments, key=lambda n: (not n.startswith("big"), n))
        for y, name in enumerate(names):
            color = "tab:blue" if name.startswith("big") else "tab:orange"
            ax.broken_barh([(a, b - a) for a, b in run.segments[name]], (y - 0.35, 0.7), color=color)
        for x, sample in zip(run.submits, run.samples):
            ax.axvline(x, color="tab:red", lw=0.8, ls="--")
            ax.annotate(f"wait {sample['wait_seconds']:.0f}s", (x, len(names) - 0.5), fontsize=8, color="tab:red")
        ax.set_yticks(range(len(names)), [n.replace(":", " / ") for n in names])
        ax.set_ylim(-0.6, len(names) + 0.1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("seconds (bars: a job on the worker; dashed: a small job submitted)")
    save_figure(fig, png)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    setup = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tailor-fairness-") as tmp:
        fair = scenario(Path(tmp) / "fair", setup, fair=True, submit_at=setup.submit_at)
        fcfs = scenario(Path(tmp) / "fcfs", setup, fair=False, submit_at=setup.submit_at[:1])
    # the long job's epoch: every epoch either run trained in one piece (the first-come run's are
    # never interrupted), validation included
    epoch_s = statistics.median(fair.long_job["epoch_seconds_uninterrupted"]
                                + fcfs.long_job["epoch_seconds_uninterrupted"])
    for sample in fair.samples + fcfs.samples:
        sample["wait_epochs"] = round(sample["wait_seconds"] / epoch_s, 3)
    waits = [s["wait_seconds"] for s in fair.samples]
    in_epochs = [s["wait_epochs"] for s in fair.samples]
    result = {
        "machine": {**machine(), "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_before],
                                                             "end": [round(x, 2) for x in os.getloadavg()]}},
        "quick": args.quick,
        "setup": {"workers": 1, "torch_threads": setup.threads, "base": "bundled all-MiniLM-L6-v2, LoRA defaults",
                  "long_job_rows": setup.long_rows, "long_job_epochs": setup.long_epochs,
                  "small_job_rows": SMALL_ROWS, "max_length": setup.max_length, "batch_size": setup.batch_size,
                  "yield_min_turn_seconds": setup.min_turn_seconds, "yield_slice_seconds": setup.slice_seconds,
                  "yield_grace_seconds": 2.0,
                  "database": "sqlite"},
        "fair": {"samples": fair.samples, "long_job": fair.long_job},
        "first_come_first_served": {"samples": fcfs.samples, "long_job": fcfs.long_job},
        "summary": {
            "max_wait_seconds": max(waits), "median_wait_seconds": statistics.median(waits),
            "max_wait_epochs": max(in_epochs),
            "fcfs_wait_seconds": fcfs.samples[0]["wait_seconds"] if fcfs.samples else None,
            "long_job_epoch_seconds": round(epoch_s, 2),
            "long_job_wall_seconds": {"fair": fair.long_job["wall_seconds"], "fcfs": fcfs.long_job["wall_seconds"]},
            "long_job_yields": len(fair.long_job["yields"]),
            "median_resume_seconds": statistics.median(fair.long_job["resume_seconds"])
            if fair.long_job["resume_seconds"] else None,
        },
        "targets": {
            "wait_within_one_epoch": max(in_epochs) <= 1.0,
            "wait_under_2_minutes": max(waits) < TARGET_WAIT_S,
            "long_job_succeeded_every_epoch_once": fair.long_job["status"] == "succeeded"
            and fair.long_job["epochs_trained"] == list(range(1, (fair.long_job["epochs_run"] or 0) + 1)),
        },
    }
    write(args.out, result)
    plot(args.out.with_suffix(".png"), {
        f"fair share (min turn {setup.min_turn_seconds:.0f} s, slice {setup.slice_seconds:.0f} s): small jobs wait {', '.join(f'{w:.0f}' for w in waits)} s": fair,
        f"first come, first served (--no-yield): the small job waits {result['summary']['fcfs_wait_seconds']:.0f} s": fcfs,
    })
    for name, ok in result["targets"].items():
        print(f"{name}: {'ok' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
