"""The training worker process: ``python -m adapters.jobs.worker --database-url ... --store-url ...``.

Loads the base model once (one pristine copy for training, one wrapped by an engine for the
promotion gate) of the first task it trains (``--tasks``, default all: text first), and each
other task's base only when that task's first job arrives, so a worker that only ever sees text
jobs never loads a vision backbone (``adapters.jobs.task_bases``). Then it loops: claim the next job in fair-share order (``adapters.jobs.fair_share``:
tenants take turns), run it until it ends or yields the worker to a waiting tenant at a
checkpoint, repeat; sleeps when the queue is empty. It shares nothing with serving but the
database and the store, so a crash, an exception or an out-of-memory kill here never takes
serving down. SIGTERM stops it gracefully: a running job is left to resume from its
checkpoint. Every lease/4 seconds it also requeues jobs whose worker's lease expired (a worker
on another node that died), so any number of workers on any nodes share one queue; ``tailor
worker`` runs this with the service's ``TAILOR_*`` settings. When idle, every ``--gc-hours``
(first at a random point of the first interval, so workers spread out) it collects the store's
garbage (``adapters.store_gc``): what deletions during a store outage or crashed writes left
behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy
import torch

from adapters.base import load_base
from adapters.catalog import Catalog
from adapters import store_gc
from adapters.errors import TailorError, UnavailableError
from adapters.jobs.fair_share import FairShare
from adapters.jobs.manager import JobManager
from adapters.jobs.parent_watch import watch_parent
from adapters.jobs.runner import WorkerContext, run_job
from adapters.jobs.task_bases import TaskBases, load_task_bases
from adapters.registry import Registry
from adapters.runtime.onnx.choice import QUANTIZE, RUNTIMES, RuntimeChoice
from adapters.tasks import IMAGE_CLASSIFICATION, TASK_NAMES, TEXT_CLASSIFICATION, TEXT_GENERATION, canonical_task
from adapters.schema import create_schema, make_engine
from adapters.store import AdapterStore, open_store

log = logging.getLogger("tailor.worker")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tailor training worker")
    p.add_argument("--database-url", required=True)
    p.add_argument("--store-url", required=True)
    p.add_argument("--base-model", default=None, help="local model directory (default: bundled MiniLM)")
    p.add_argument("--image-base-model", default=None,
                   help="local vision checkpoint directory, or tiny[:SEED] (tests) (default: bundled "
                        "EfficientNet-Lite0); loaded on the first image job")
    p.add_argument("--generation-base-model", default=None,
                   help="local causal-LM directory, or tiny[:SEED] (tests) (default: bundled SmolLM2-135M-Instruct); "
                        "loaded on the first text-generation job")
    p.add_argument("--tasks", type=_tasks, default=TASK_NAMES,
                   help="comma-separated task kinds this worker trains (default: all); the first one's base "
                        "loads at start, the others' on their first job; a job of another task fails saying so")
    p.add_argument("--device", default=None)
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="the serving runtime the gate scores candidates on (TAILOR_RUNTIME)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help="its precision (TAILOR_QUANTIZE)")
    p.add_argument("--graph-cache", type=Path, default=None,
                   help="the service's ONNX graph cache (TAILOR_HOME/graphs) when --runtime is not torch")
    p.add_argument("--checkpoints", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training")
    p.add_argument("--nice", type=int, default=10,
                   help="CPU priority offset: training yields the cores to serving when both want them")
    p.add_argument("--poll-seconds", type=float, default=0.5)
    p.add_argument("--heartbeat-seconds", type=float, default=1.0)
    p.add_argument("--lease-seconds", type=float, default=60.0)
    p.add_argument("--once", action="store_true", help="run at most one job, then exit")
    p.add_argument("--no-yield", action="store_true",
                   help="never give a running job's worker to another tenant (the claim order stays fair)")
    p.add_argument("--yield-min-turn-seconds", type=float, default=FairShare.min_turn_seconds,
                   help="a job keeps its worker at least this long before it yields to another tenant")
    p.add_argument("--yield-slice-seconds", type=float, default=FairShare.slice_seconds,
                   help="a job's turn this long may end mid-epoch when another tenant waits "
                        "(otherwise at the next epoch end)")
    p.add_argument("--yield-grace-seconds", type=float, default=FairShare.grace_seconds,
                   help="another tenant's job must have waited this long before a running job yields to it")
    p.add_argument("--gc-hours", type=float, default=6.0,
                   help="collect the store's garbage this often, when idle (0: never)")
    p.add_argument("--gc-grace-hours", type=float, default=store_gc.DEFAULT_GRACE_S / 3600,
                   help="only objects unreferenced for longer than this are deleted")
    return p.parse_args(argv)


def collect_garbage(db: sqlalchemy.Engine, store: AdapterStore, grace_s: float) -> None:
    """One store GC round; never fatal: training matters more, and the next round catches up."""
    try:
        report = store_gc.collect(db, store, grace_s=grace_s)
    except TailorError as e:  # the database or the store is away
        log.warning("store gc skipped: %s", e)
    except Exception:  # noqa: BLE001 - a GC bug must not stop training
        log.exception("store gc failed")
    else:
        log.info("store gc: %d objects examined, %d deleted (%d bytes), %d temp objects removed",
                 report.examined, len(report.deleted), report.bytes_freed, report.temp_removed)


def _tasks(value: str) -> tuple[str, ...]:
    given = {canonical_task(t.strip()) for t in value.split(",") if t.strip()}
    if not given:
        raise ValueError("no task given")
    return tuple(t for t in TASK_NAMES if t in given)


def image_bases(setting: str | None, device: str | None, catalog: Catalog, runtime: RuntimeChoice | None = None,
                graph_dir: Path | None = None) -> TaskBases:
    """The image base and its gate engine (imported here: a text-only worker never loads them).
    ``setting``: None (bundled EfficientNet-Lite0), ``tiny[:SEED]`` or a checkpoint directory."""
    from adapters.vision.backbone import vision_base_from_setting

    log.info("loading the image base (%s)", setting or "bundled")
    return load_task_bases(vision_base_from_setting(setting, device=device), catalog, runtime, graph_dir)


def generation_bases(setting: str | None, device: str | None) -> TaskBases:
    """The generation base (imported here: a classification worker never loads it); its gate
    scores on this pristine base (``adapters.jobs.generation_gate``), so there is no gate engine."""
    from adapters.generation.base import load_causal_base

    log.info("loading the generation base (%s)", setting or "bundled")
    return TaskBases(trainer_base=load_causal_base(setting, device=device), engine=None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.nice:
        os.nice(args.nice)
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    watch_parent(stop)  # started by a serving process's pool: stop when it is gone

    db = make_engine(args.database_url)
    create_schema(db)
    store = open_store(args.store_url)
    catalog = Catalog(Registry.from_engine(db), store)
    runtime = RuntimeChoice(args.runtime, args.quantize)  # the gate scores on what serves
    loaders: dict[str, Callable[[], TaskBases]] = {
        TEXT_CLASSIFICATION: lambda: load_task_bases(load_base(args.base_model, device=args.device), catalog,
                                                     runtime, args.graph_cache),
        IMAGE_CLASSIFICATION: lambda: image_bases(args.image_base_model, args.device, catalog, runtime,
                                                  args.graph_cache),
        TEXT_GENERATION: lambda: generation_bases(args.generation_base_model, args.device),
    }
    first = loaders[args.tasks[0]]()
    ctx = WorkerContext(
        manager=JobManager(db, store, lease_seconds=args.lease_seconds), catalog=catalog,
        trainer_base=first.trainer_base, engine=first.engine, worker_id=worker_id(),
        base_loaders={t: loaders[t] for t in args.tasks[1:]},
        checkpoint_root=args.checkpoints,
        threads=args.threads, heartbeat_seconds=args.heartbeat_seconds,
        fair_share=FairShare(yield_worker=not args.no_yield, min_turn_seconds=args.yield_min_turn_seconds,
                             slice_seconds=args.yield_slice_seconds, grace_seconds=args.yield_grace_seconds),
    )
    log.info("worker %s ready (base %s; trains %s)", ctx.worker_id, first.trainer_base.spec.name,
             ", ".join(args.tasks))
    next_recover = 0.0
    gc_every = args.gc_hours * 3600
    next_gc = time.monotonic() + random.uniform(0.1, 1.0) * gc_every
    while not stop.is_set():
        try:
            if time.monotonic() >= next_recover:
                # Workers on other nodes may have died mid-job: once their lease has expired, any
                # worker requeues the job (it resumes from its checkpoint where one is shared).
                for job_id in ctx.manager.recover():
                    log.warning("requeued job %s: its worker's lease expired", job_id)
                next_recover = time.monotonic() + max(1.0, args.lease_seconds / 4)
            job = ctx.manager.claim(ctx.worker_id)
        except UnavailableError as e:  # the database is away: wait for it, do not die
            log.warning("%s; retrying in %.0f s", e, max(2.0, args.poll_seconds))
            stop.wait(max(2.0, args.poll_seconds))
            continue
        if job is None:
            if gc_every > 0 and time.monotonic() >= next_gc:
                next_gc = time.monotonic() + gc_every
                collect_garbage(db, store, args.gc_grace_hours * 3600)
            if args.once:
                break
            stop.wait(args.poll_seconds)
            continue
        log.info("running job %s for %s/%s", job.id, job.tenant, job.adapter)
        status = run_job(job, ctx, shutdown=stop)
        log.info("job %s: %s", job.id, status)
        if args.once:
            break
    log.info("worker %s stopped", ctx.worker_id)


if __name__ == "__main__":
    main()
