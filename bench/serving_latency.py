"""Serving latency while a tenant's adapter trains: the part of ``bench.quality`` that needs a worker.

``serving_latency`` measures p50/p99 of single-row predictions through the engine with no
training running, then while a training worker process (``adapters.jobs.worker``, one thread,
nice 10) runs a LoRA job: the measurement starts once that job is ``running`` and has taken a
training step, and the answer records whether it was running throughout (same status and
attempt at both ends) and how many training steps it took during the measurement.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapters.catalog import Catalog
from adapters.jobs.manager import JobManager
from adapters.jobs.model import JobEvent
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from bench.common import percentile

TRAIN_THREADS = 1
TRAINING_START_TIMEOUT_S = 300.0  # the worker process loads the base model, then the job starts
WARMUP_REQUESTS = 10


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
