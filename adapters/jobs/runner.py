"""One job, start to finish, inside a worker process.

``run_job`` takes a claimed job through ``validating`` (read its data back from the store,
split a stratified validation set if none was given, resolve hyper-parameters) and
``running`` (train with progress, events and a checkpoint per epoch), then publishes the
adapter as a new *candidate* version, scores it against the current ``prod`` on the same
validation data and lets the gate decide whether it becomes ``prod``. Everything that differs
by the job's task is looked up by it: its stored data (``adapters.jobs.task_data``), the
trainer (``trainer_for``: the task module's own) and the worker's bases for it
(``WorkerContext.bases``: the base trained and the engine the gate scores on, loaded on the
task's first job). Cancellation is honoured
until the adapter is published: a cancel the API accepted before then ends the job
``cancelled`` (the database is asked once more before publishing, and before recording a
training error, whatever the heartbeat has seen); a cancelled or failed job registers
nothing. Whatever happens, the job ends in a final state with a reason -- unless the worker is shutting down or
lost the job, in which case it is left for ``recover`` to requeue from its checkpoint, or the
job yields the worker to another tenant (``adapters.jobs.fair_share``): then it is ``queued``
again with its checkpoint in the store, and whichever worker claims it next resumes from there.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import BaseModel
from adapters.catalog import Catalog
from adapters.errors import AdapterNotFoundError, TailorError, UnavailableError
from adapters.jobs import gate, shared_checkpoints, task_data
from adapters.jobs.fair_share import Contender, FairShare, YieldCheck
from adapters.jobs.heartbeat import Heartbeat
from adapters.jobs.manager import JobManager, LostJobError
from adapters.jobs.model import Job
from adapters.jobs.task_bases import TaskBases, WorkerBases
from adapters.jobs.trainers import trainer_for
from adapters.runtime.engine import Engine
from adapters.training import TrainCallbacks, TrainingCancelled
from adapters.training.search import describe as describe_search
from adapters.training.trainer import TrainingYielded

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    manager: JobManager
    catalog: Catalog
    trainer_base: BaseModel  # pristine: the trainer copies it, never wraps it
    engine: Engine  # scores candidates for the gate, on its own copy of the base
    worker_id: str
    checkpoint_root: Path
    threads: int | None = None
    heartbeat_seconds: float = 1.0
    progress_seconds: float = 1.0
    fair_share: FairShare = field(default_factory=FairShare)
    # other tasks' bases (task -> loader), each loaded on the first job of its task only
    base_loaders: Mapping[str, Callable[[], TaskBases]] = field(default_factory=dict)
    _bases: WorkerBases | None = field(default=None, init=False, repr=False)

    def bases(self, task: str) -> TaskBases:
        """The bases for a job of ``task`` (``adapters.jobs.task_bases.WorkerBases.get``)."""
        if self._bases is None:
            self._bases = WorkerBases(TaskBases(self.trainer_base, self.engine), self.base_loaders)
        return self._bases.get(task)




class ShuttingDown(Exception):
    """The worker process was asked to stop; the job goes back to the queue."""


def run_job(job: Job, ctx: WorkerContext, shutdown: Any = None) -> str:
    """Run ``job``; returns its final status, ``"released"`` when left for recovery, or
    ``"yielded"`` when it gave the worker to another tenant and is queued again."""
    m = ctx.manager
    ckpt = ctx.checkpoint_root / job.id
    turn = YieldCheck(ctx.fair_share, lambda: _contender(job, ctx))
    shared = _Shared()
    with Heartbeat(m, job.id, ctx.worker_id, ctx.heartbeat_seconds) as hb:
        if shutdown is not None:
            hb.shutdown = shutdown
        try:
            train_ds, val_ds = _datasets(job, ctx)
            trainer = trainer_for(job.task)
            bases = ctx.bases(job.task)  # loaded on this worker's first job of the task
            resolved = trainer.resolve(trainer.parse(job.hyperparameters), train_ds, job.method,
                                       bases.trainer_base)
            summary = {**job.dataset, "training_examples": len(train_ds), "validation_examples": len(val_ds),
                       "validation_split": job.validation_key is None}
            m.set_running(job.id, ctx.worker_id, resolved.to_dict(), summary)
            fetched = shared_checkpoints.fetch(m.store, job.tenant, job.id, ckpt)
            # fetched: the checkpoint came through the store (another worker's, or this one's after
            # it yielded the job and dropped its local copy)
            resuming = " (resuming from " + ("its checkpoint in the store)" if fetched else "checkpoint)")
            m.event(job.id, "info", f"training {job.method} on {len(train_ds)} examples, validating on "
                    f"{len(val_ds)}" + (resuming if (ckpt / "state.json").exists() else ""))
            result = trainer.train(
                bases.trainer_base, train_ds, val_ds, method=job.method, hp=resolved,
                callbacks=_callbacks(job, ctx, hb, turn, shared), checkpoint_dir=ckpt, threads=ctx.threads,
            )
            if hb.should_stop() or hb.cancel_now():  # a cancel accepted before publishing wins
                raise TrainingCancelled("cancelled")
            assert result.artifact is not None
            m.check_adapter_task(job)  # its adapter may have become another task's meanwhile
            record = ctx.catalog.publish(job.tenant, job.adapter, result.artifact.made_by_job(job.id),
                                         spec=bases.trainer_base.spec)
            own_gate = gate.task_gate(job.task)  # a task's own gate (generation: validation loss), else accuracy
            decision = own_gate(job, bases.trainer_base, ctx.catalog, record.version, val_ds) if own_gate \
                else _gate(job, bases.engine, record.version, val_ds)
            if decision.promote:
                ctx.catalog.registry.set_alias(job.tenant, job.adapter, "prod", record.version)
            m.succeed(job.id, ctx.worker_id, version=record.version, metrics=result.metrics,
                      result={"gate": decision.to_dict(), "promoted": decision.promote},
                      message=f"job succeeded: version {record.version} "
                              f"{'is now prod' if decision.promote else 'kept as a candidate'} ({decision.reason})")
            _cleanup(ckpt, job, ctx)
            return "succeeded"
        except TrainingCancelled:
            if hb.lost.is_set():
                return "released"
            if hb.shutdown.is_set() and not hb.cancelled.is_set():
                m.event(job.id, "warning", "worker shutting down; the job will resume from its checkpoint")
                return "released"
            return _cancelled(job, ctx, ckpt)
        except TrainingYielded as y:
            return _give_way(job, ctx, ckpt, turn, shared, y)
        except LostJobError:
            log.warning("job %s was taken from worker %s", job.id, ctx.worker_id)
            return "released"
        except UnavailableError as e:  # database or store gone for now: not the job's fault
            log.warning("job %s released: %s; it is requeued when its lease expires and resumes "
                        "from its checkpoint", job.id, e)
            return "released"
        except TailorError as e:  # dataset problems, divergence, bad hyper-parameters, ...
            if _cancel_wins(hb):  # the tenant asked to stop first: that is how the job ends
                m.event(job.id, "info", f"training stopped ({e.code}: {e.message}) while being cancelled")
                return _cancelled(job, ctx, ckpt)
            return _fail(job, ctx, ckpt, e.code, e.message)
        except Exception as e:
            log.exception("job %s crashed", job.id)
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            return _fail(job, ctx, ckpt, "internal_error", f"training crashed: {type(e).__name__}: {e}",
                         event=detail)


def _cancelled(job: Job, ctx: WorkerContext, ckpt: Path) -> str:
    """End the job ``cancelled`` (nothing registered) and drop its checkpoint."""
    ctx.manager.mark_cancelled(job.id, ctx.worker_id)
    _cleanup(ckpt, job, ctx)
    return "cancelled"


def _cancel_wins(hb: Heartbeat) -> bool:
    """Whether a cancel was requested (asked of the database now; False if it cannot be asked)."""
    try:
        return hb.cancel_now()
    except Exception:  # the database is away: the failure is recorded (or the job released) as usual
        log.warning("job %s: could not read whether a cancel was requested", hb.job_id, exc_info=True)
        return False


def _fail(job: Job, ctx: WorkerContext, ckpt: Path, code: str, message: str, *, event: str | None = None) -> str:
    """Record the job as failed; ``"released"`` when the job is no longer this worker's to record
    (its lease was taken, or its tenant deleted, e.g. between the last stop check and publish)."""
    m = ctx.manager
    try:
        if event is not None:
            m.event(job.id, "error", event)
        m.fail(job.id, ctx.worker_id, code, message)
    except LostJobError:
        log.warning("job %s failed (%s) but is no longer worker %s's to record", job.id, code, ctx.worker_id)
        return "released"
    _cleanup(ckpt, job, ctx)
    return "failed"


def _give_way(job: Job, ctx: WorkerContext, ckpt: Path, turn: YieldCheck, shared: _Shared,
              y: TrainingYielded) -> str:
    """The trainer stopped at a checkpoint for another tenant: queue the job again."""
    m = ctx.manager
    where = f"at step {y.step}, inside epoch {y.epoch}" if y.mid_epoch else f"after epoch {y.epoch - 1}"
    try:
        if not m.release(job.id, ctx.worker_id, message="yielded the worker to another tenant's waiting job "
                         f"(fair share); it resumes from its checkpoint {where}"):
            return _cancelled(job, ctx, ckpt)  # a cancel came in meanwhile
    except (LostJobError, UnavailableError) as e:  # recovery requeues it; the checkpoint stays
        log.warning("job %s: could not give the worker back (%s); left for recovery", job.id, e)
        return "released"
    found = turn.found
    log.info("job %s of tenant %s yields the worker to tenant %s (waiting %.1f s); checkpoint %s",
             job.id, job.tenant, found.tenant if found else "?", found.waited_seconds if found else 0.0, where)
    if shared.ok:  # the store has it: whichever worker runs the job next fetches the newest
        shutil.rmtree(ckpt, ignore_errors=True)
    return "yielded"


def _datasets(job: Job, ctx: WorkerContext) -> tuple[Any, Any]:
    """The job's (training, validation) datasets of its task, read back checksummed."""
    store = ctx.manager.store
    train_ds = task_data.load(job.task, store.get(job.training_key, sha256=job.training_sha256))
    if job.validation_key:
        val_ds = task_data.load(job.task, store.get(job.validation_key, sha256=job.validation_sha256))
        overlap = task_data.check_validation(train_ds, val_ds)
        if overlap:
            ctx.manager.event(job.id, "warning", f"{overlap} validation {task_data.NOUNS[job.task]} also appear "
                              "in the training data; validation scores will be optimistic")
        return train_ds, val_ds
    seed = job.hyperparameters.get("seed", 0)
    return task_data.split(train_ds, fraction=task_data.validation_fraction(len(train_ds)),
                           seed=seed if isinstance(seed, int) else 0)


@dataclass
class _Shared:
    ok: bool = True  # the last checkpoint reached the store


def _contender(job: Job, ctx: WorkerContext) -> Contender | None:
    try:
        return ctx.manager.contender(job.id, grace_seconds=ctx.fair_share.grace_seconds)
    except UnavailableError as e:  # the database is away: keep the worker, ask again later
        log.warning("job %s: could not look for waiting tenants (%s)", job.id, e)
        return None


def _callbacks(job: Job, ctx: WorkerContext, hb: Heartbeat, turn: YieldCheck, shared: _Shared) -> TrainCallbacks:
    m, last = ctx.manager, [0.0]
    started = time.monotonic()
    ref: list[tuple[float, int]] = []  # (time, steps done) the ETA's rate counts from: this turn only

    def on_step(step: int, total: int, epoch: int, loss: float) -> None:
        now = time.monotonic()
        m.event(job.id, "info", f"step {step}/{total}: train loss {loss:.4f}", type="metrics",
                data={"step": step, "total_steps": total, "epoch": epoch, "train_loss": loss})
        if not ref:  # a fresh run counts from its start, a resumed one from its first report here
            ref.append((started, 0) if step <= 10 else (now, step))
        if now - last[0] >= ctx.progress_seconds or step == total:
            last[0] = now
            rate = (step - ref[0][1]) / max(now - ref[0][0], 1e-6)
            m.progress(job.id, ctx.worker_id, {
                "step": step, "total_steps": total, "epoch": epoch, "fraction": step / max(total, 1),
                "eta_seconds": round((total - step) / rate, 1) if rate > 0 else None,
            })

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        data = {"epoch": epoch, **{k: v for k, v in metrics.items() if k != "confusion_matrix"}}
        m.event(job.id, "info", f"epoch {epoch}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in data.items() if isinstance(v, float)), type="metrics", data=data)

    def on_event(level: str, message: str) -> None:
        m.event(job.id, level, message)

    def on_search(record: dict[str, Any]) -> None:  # adapters.training.search: each event as it happens
        m.event(job.id, "info", describe_search(record), type="search", data=record)

    def on_checkpoint(folder: Path) -> None:
        shared.ok = shared_checkpoints.share(m.store, job.tenant, job.id, folder)
        if not shared.ok:
            m.event(job.id, "warning", "this checkpoint could not be copied to the store; "
                    "only this worker can resume the job")

    def should_yield(at_epoch_end: bool) -> bool:
        # not while the store is away: another worker resuming the job could not fetch its progress
        return shared.ok and not hb.should_stop() and turn(at_epoch_end)

    return TrainCallbacks(on_step=on_step, on_epoch=on_epoch, should_stop=hb.should_stop, on_event=on_event,
                          on_checkpoint=on_checkpoint, should_yield=should_yield, on_search=on_search)


def _gate(job: Job, engine: Engine, version: int, val_ds: Any) -> gate.GateDecision:
    """Score the candidate and ``prod`` on the engine of the job's task, and decide."""
    inputs, limits = task_data.raw_inputs(val_ds)
    labels = [e.label for e in val_ds.examples]
    candidate = gate.score(engine, engine.acquire(engine.resolve(job.tenant, f"{job.adapter}@{version}")),
                           inputs, labels, limits=limits)
    try:
        prod = engine.resolve(job.tenant, f"{job.adapter}@prod")
        prod_score = gate.score(engine, engine.acquire(prod), inputs, labels, limits=limits)
        prod_version = prod.key.version
    except AdapterNotFoundError:
        prod_score, prod_version = None, None
    return gate.decide(job.promote, candidate, prod_score, prod_version, labels)


def _cleanup(ckpt: Path, job: Job, ctx: WorkerContext) -> None:
    """The job has ended: its checkpoints, here and shared, are of no further use."""
    shutil.rmtree(ckpt, ignore_errors=True)
    shared_checkpoints.discard(ctx.manager.store, job.tenant, job.id)
