"""Quality benchmark: LoRA vs head-only vs full fine-tuning of the same base, on real data.

    python -m bench.quality --dataset {imdb,bbc} [--quick] --out bench/results/quality-imdb.json

Trains each method on a fixed seeded subset (IMDB: 2,000 train / 1,000 test; BBC: 1,225 /
900; 128 tokens; --quick: a few hundred), scores on the held-out test set, and writes
``{method: {accuracy, macro_f1, train_seconds, trainable_params, ...}}`` plus a PNG of the
learning curves. It also measures serving latency (p50/p99 of single-row predictions through
the engine) with no training running and while a training worker process runs a job: the
measurement starts once that job is ``running`` and has taken a training step, and the JSON
records whether it was running throughout (same status and attempt at both ends) and how many
training steps it took during the measurement (``serving_latency_ms.training_job``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from adapters.base import load_base
from adapters.catalog import Catalog
from adapters.jobs.manager import JobManager
from adapters.jobs.model import JobEvent
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from adapters.training import Hyperparameters, TrainCallbacks, train
from adapters.training.metrics import classification_metrics
from bench import data
from bench.common import machine, parser, percentile, save_figure, write

SIZES = {"imdb": (2000, 1000), "bbc": (1225, 900)}
QUICK_SIZES = {"imdb": (300, 200), "bbc": (300, 200)}
METHODS = ("lora", "head", "full")
TRAIN_THREADS = 1
TRAINING_START_TIMEOUT_S = 300.0  # the worker process loads the base model, then the job starts
WARMUP_REQUESTS = 10


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(SIZES), required=True)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list, or 'none' for latency only")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--include", type=Path, action="append", default=[],
                   help="an earlier run's JSON (same dataset, sizes and seed): methods not run now are "
                        "copied from it, marked with where they came from (training is deterministic "
                        "on CPU for a seed; their train_seconds are from that run's machine load)")
    p.add_argument("--hyperparameters", type=json.loads, default={},
                   help='JSON object of explicit hyper-parameters for every method, e.g. \'{"lora_r": 16}\'')
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n_train, n_test = (QUICK_SIZES if args.quick else SIZES)[args.dataset]
    rows = data.load(args.dataset)
    train_rows, test_rows = data.split(rows, n_train, n_test, seed=0)
    labels = tuple(sorted({r["label"] for r in rows}))
    index = {name: i for i, name in enumerate(labels)}
    # the trainer needs a validation set for early stopping: carve it from train, never from test
    val_rows, fit_rows = train_rows[: len(train_rows) // 10], train_rows[len(train_rows) // 10 :]
    base = load_base(max_length=128)
    result: dict[str, Any] = {
        "machine": machine(), "dataset": args.dataset, "quick": args.quick, "labels": list(labels),
        "n_train": len(fit_rows), "n_validation": len(val_rows), "n_test": len(test_rows), "max_length": 128,
    }
    curves: dict[str, list[dict[str, Any]]] = {}
    for method in [] if args.methods == "none" else args.methods.split(","):
        history: list[dict[str, Any]] = []
        cb = TrainCallbacks(on_epoch=lambda e, m, h=history, meth=method: log_epoch(meth, h, e, m))
        hp = Hyperparameters.from_dict({"seed": 0, "max_length": 128, **args.hyperparameters})
        t0 = time.perf_counter()
        res = train(base, [r["text"] for r in fit_rows], [index[r["label"]] for r in fit_rows], labels,
                    [r["text"] for r in val_rows], [index[r["label"]] for r in val_rows],
                    method=method, hp=hp, callbacks=cb)
        seconds = time.perf_counter() - t0
        preds = predict(res.model, base, [r["text"] for r in test_rows])
        m = classification_metrics([index[r["label"]] for r in test_rows], preds, len(labels))
        result[method] = {
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "train_seconds": seconds,
            "trainable_params": res.trainable_params, "total_params": res.total_params,
            "trainable_fraction": res.trainable_params / res.total_params, "epochs_run": len(history),
            "best_epoch": res.best_epoch, "hyperparameters": res.hyperparameters,
        }
        curves[method] = history
        print(f"{method}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} in {seconds:.0f}s")
    for path in args.include:
        earlier = json.loads(path.read_text())
        if (earlier["dataset"], earlier["n_train"], earlier["n_test"]) != (args.dataset, len(fit_rows), len(test_rows)):
            raise SystemExit(f"{path}: a different dataset or split; cannot include it")
        for method in METHODS:
            if method in earlier and method not in result:
                result[method] = {**earlier[method], "from_run": {"file": path.name, "when": earlier["machine"]["when"]}}
                curves[method] = earlier.get("curves", {}).get(method, [])
        if "serving_latency_ms" in earlier and args.skip_latency:
            result["serving_latency_ms"] = {**earlier["serving_latency_ms"], "from_run": path.name}
    if "lora" in result and "full" in result and "head" in result:
        result["lora_minus_full_points"] = 100 * (result["lora"]["accuracy"] - result["full"]["accuracy"])
        result["lora_minus_head_points"] = 100 * (result["lora"]["accuracy"] - result["head"]["accuracy"])
    result["curves"] = curves
    if not args.skip_latency:
        result["serving_latency_ms"] = serving_latency(base, fit_rows, quick=args.quick)
    write(args.out, result)
    plot_curves(args.out.with_suffix(".png"), curves, args.dataset)


def log_epoch(method: str, history: list[dict[str, Any]], epoch: int, m: dict[str, Any]) -> None:
    history.append({"epoch": epoch, **m})
    print(f"{method} epoch {epoch}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, "
          f"val accuracy {m['val_accuracy']:.4f}", flush=True)


@torch.inference_mode()
def predict(model: torch.nn.Module, base, texts: list[str], batch: int = 64) -> list[int]:
    model.eval()
    out: list[int] = []
    for i in range(0, len(texts), batch):
        enc = base.tokenize(texts[i : i + batch], max_length=128)
        out += model(**enc).logits.argmax(-1).tolist()
    return out


def serving_latency(base, rows: list[dict[str, str]], *, quick: bool) -> dict[str, Any]:
    """p50/p99 of one-row predictions via the engine, idle vs while a worker process trains."""
    with tempfile.TemporaryDirectory(prefix="tailor-quality-") as tmp:
        tmpdir = Path(tmp)
        db_url = f"sqlite:///{tmpdir}/r.db"
        catalog = Catalog(Registry(db_url), LocalStore(tmpdir / "store"))
        catalog.registry.create_tenant("bench")
        from adapters.synthetic import random_artifact

        serving = copy.copy(base)
        serving.model = copy.deepcopy(base.model)
        engine = Engine(serving, catalog)
        catalog.publish("bench", "live", random_artifact(serving.spec, seed=1), promote=True)
        adapter = engine.acquire(engine.resolve("bench", "live"))
        texts = [r["text"] for r in rows[:64]]
        n = 60 if quick else 200
        # Serving keeps the cores the training worker does not use (the service does the same).
        serve_threads = max(1, (os.cpu_count() or 2) - TRAIN_THREADS)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(serve_threads)

        def measure() -> list[float]:
            ms = []
            for i in range(n):
                t = time.perf_counter()
                engine.classify([texts[i % len(texts)]], [adapter])
                ms.append((time.perf_counter() - t) * 1e3)
            return ms

        for i in range(WARMUP_REQUESTS):  # untimed: the first calls are slow, and would count as idle
            engine.classify([texts[i % len(texts)]], [adapter])
        idle = measure()
        jm, job_id = submit_training_job(tmpdir, db_url, rows)
        log_path = tmpdir / "worker.log"
        worker = start_training_worker(tmpdir, db_url, log_path)
        try:
            start = wait_until_training(jm, job_id, worker, log_path, TRAINING_START_TIMEOUT_S)
            t0 = time.perf_counter()
            busy = measure()
            window = {**training_window(jm, job_id, start), "measurement_s": round(time.perf_counter() - t0, 2)}
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            torch.set_num_threads(threads_before)
    if not window["running_throughout"]:
        print(f"warning: the training job did not run throughout the measurement: {window}", flush=True)
    elif not window["steps_during_measurement"]:
        print(f"warning: the training job was running but took no step during the measurement (serving "
              f"had the cores; the trainer runs at nice 10): {window}", flush=True)
    p99_idle, p99_busy = percentile(idle, 0.99), percentile(busy, 0.99)
    return {"idle": {"p50": percentile(idle, 0.5), "p99": p99_idle},
            "training": {"p50": percentile(busy, 0.5), "p99": p99_busy},
            "p99_ratio": p99_busy / p99_idle, "requests": n, "training_job": window,
            "setup": f"serving in this process with {serve_threads} torch thread(s); one training worker "
                     f"process (--threads {TRAIN_THREADS}, nice 10) training a LoRA job, measured once "
                     "the job was running and had taken a step"}


def submit_training_job(tmpdir: Path, db_url: str, rows: list[dict[str, str]]) -> tuple[JobManager, str]:
    """A LoRA job long enough to outlast the measurement (no early stop)."""
    from adapters.datasets import from_records
    from adapters.schema import make_engine

    jm = JobManager(make_engine(db_url), LocalStore(tmpdir / "store"))
    job = jm.submit("bench", "trainee", training=from_records(rows[:400]),
                    hyperparameters={"epochs": 20, "patience": 20})
    return jm, job.id


def start_training_worker(tmpdir: Path, db_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "adapters.jobs.worker", "--database-url", db_url, "--store-url",
           str(tmpdir / "store"), "--checkpoints", str(tmpdir / "ckpt"), "--threads", str(TRAIN_THREADS)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def job_events(jm: JobManager, job_id: str, after: int = 0) -> list[JobEvent]:
    """Every event of the job after event ``after`` (all pages)."""
    out: list[JobEvent] = []
    while page := jm.events("bench", job_id, after=out[-1].id if out else after):
        out += page
    return out


def training_steps(events: list[JobEvent]) -> int:
    """Optimizer steps among ``events`` (the worker records each one)."""
    return sum(1 for e in events if e.type == "metrics" and e.data and "total_steps" in e.data)


def wait_until_training(jm: JobManager, job_id: str, worker: subprocess.Popen[bytes], log_path: Path,
                        timeout: float) -> dict[str, Any]:
    """Wait (at most ``timeout`` s) until the job is ``running`` and has taken a training step;
    the job's state then: status, attempts and the id of its last event so far."""
    t0 = time.monotonic()
    while True:
        job = jm.get("bench", job_id)
        events = job_events(jm, job_id)
        if job.status == "running" and training_steps(events):
            return {"status": job.status, "attempts": job.attempts, "event_id": events[-1].id,
                    "waited_s": round(time.monotonic() - t0, 1)}
        if job.status in ("succeeded", "failed", "cancelled") or worker.poll() is not None \
                or time.monotonic() - t0 > timeout:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the training job never started training (job {job.status}, worker exit "
                             f"{worker.poll()}, waited {timeout:.0f}s):\n{tail}")
        time.sleep(0.2)


def training_window(jm: JobManager, job_id: str, start: dict[str, Any]) -> dict[str, Any]:
    """The job during the measurement that began at ``start``: ``running_throughout`` when it
    was running at both ends, on the same attempt, and never handed to a worker again
    meanwhile; ``steps_during_measurement``: the training steps it took."""
    job = jm.get("bench", job_id)
    during = job_events(jm, job_id, after=start["event_id"])
    reclaimed = any(e.message.startswith("picked up by worker") for e in during)
    return {
        "status_at_start": start["status"], "status_at_end": job.status,
        "running_throughout": start["status"] == job.status == "running" and job.attempts == start["attempts"]
        and not reclaimed,
        "steps_during_measurement": training_steps(during), "waited_for_running_s": start["waited_s"],
    }


def plot_curves(png: Path, curves: dict[str, list[dict[str, Any]]], dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, hist in curves.items():
        epochs = [h["epoch"] for h in hist]
        ax1.plot(epochs, [h.get("train_loss", float("nan")) for h in hist], marker="o", label=f"{method} train")
        ax1.plot(epochs, [h.get("val_loss", float("nan")) for h in hist], marker="x", ls="--", label=f"{method} val")
        ax2.plot(epochs, [h.get("val_accuracy", float("nan")) for h in hist], marker="o", label=method)
    ax1.set(title=f"{dataset}: loss", xlabel="epoch", ylabel="loss")
    ax2.set(title=f"{dataset}: validation accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, png)


if __name__ == "__main__":
    main()
