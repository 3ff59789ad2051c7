"""The job lifecycle, kept entirely in the registry database so it survives restarts.

API side: ``submit`` (the dataset was validated before; the job starts ``queued``), ``get``,
``list``, ``events``, ``cancel``. Worker side: ``claim`` hands one runnable queued job to
exactly one worker (one transaction; ``FOR UPDATE SKIP LOCKED`` where the database has it)
under a lease, honouring each tenant's ``max_concurrent_jobs``; which job is the fair-share
rule of ``adapters.jobs.fair_share`` (tenants take turns by how recently they last had a
worker; a tenant's jobs in submit order). The worker then reports progress and events, renews
its lease with ``heartbeat`` (which also tells it whether a cancel was requested), asks
``contender`` at its checkpoints whether another tenant is waiting for a worker, gives the
worker back with ``release`` (the job is ``queued`` again and resumes from its checkpoint) and
ends the job with ``succeed``, ``fail`` or ``mark_cancelled``. A queued job shows its
``queue_position`` (1: taken next), and every entry into the queue records it in an event.
Every worker-side write names the worker and is ignored if the job is no longer its own, so a
worker that lost its lease can never overwrite the job's fate.

``recover`` finds jobs whose worker died (lease expired, or a local process that no longer
exists): they go back to ``queued`` to resume from their last checkpoint, or fail with
``worker_lost`` after ``max_attempts``. A tenant sees only its own jobs: another tenant's job
id is "not found".

Concurrency, on SQLite (writers serialised by ``BEGIN IMMEDIATE``) and PostgreSQL (row locks):
two workers never claim the same job, a tenant never has more than ``max_concurrent_jobs``
claimed or ``max_active_jobs`` active jobs (its tenant row is locked while they are counted),
and two supervisors recovering at once requeue a job once, never one another worker has
meanwhile claimed. Every write is one ``adapters.schema.transaction``: one that PostgreSQL
aborts as a deadlock or serialization victim is rerun, so such a race costs no failed call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, case, func, insert, or_, select, update

from adapters import schema
from adapters.datasets import Dataset
from adapters.errors import ConflictError, NotFoundError, TailorError
from adapters.fingerprint import BaseSpec
from adapters.import_checks import check_target_modules
from adapters.jobs import fair_share
from adapters.jobs.fair_share import Contender, QueuedJob, TenantClock
from adapters.jobs.files import dataset_to_jsonl, new_id
from adapters.jobs.model import (
    ACTIVE, CANCELLED, FAILED, FINISHED, METHODS, PROMOTE_MODES, QUEUED, RUNNING, SUCCEEDED, VALIDATING,
    Job, JobDurations, JobError, JobEvent,
)
from adapters.names import validate_name
from adapters.quotas import TenantQuotas, enforce_job
from adapters.schema import read_only, transaction, utcnow
from adapters.store import AdapterStore
from adapters.training.hyperparams import HyperparameterError, Hyperparameters

_JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")
log = logging.getLogger(__name__)
J = schema.jobs


def _run_seconds(dialect: str) -> ColumnElement[float]:
    if dialect == "postgresql":
        return func.extract("epoch", J.c.finished_at - J.c.started_at)
    # SQLite keeps UTC wall times as text (see schema.UTCDateTime)
    return (func.julianday(J.c.finished_at) - func.julianday(J.c.started_at)) * 86400.0


class JobLimitError(TailorError):
    """A tenant already has as many active jobs as its quota allows."""

    code = "job_quota_exceeded"


class InvalidJobError(TailorError, ValueError):
    code = "invalid_job"


class JobManager:
    def __init__(self, db: Engine, store: AdapterStore, *, lease_seconds: float = 60.0,
                 clock: Callable[[], datetime] = utcnow) -> None:
        """``clock``: the aware UTC time the manager stamps jobs with and judges leases by
        (tests inject one to let a lease run out without waiting)."""
        self.db, self.store = db, store
        self.now = clock
        self._read = read_only(db)
        self.lease = timedelta(seconds=lease_seconds)

    # -- API side -----------------------------------------------------------------------------

    def submit(
        self, tenant: str, adapter: str, *, training: Dataset, validation: Dataset | None = None,
        method: str = "lora", hyperparameters: dict[str, Any] | None = None, promote: str = "auto",
        training_file: str | None = None, validation_file: str | None = None, spec: BaseSpec | None = None,
    ) -> Job:
        """``spec``: the base model the job will train on, when the caller has it loaded; LoRA
        ``target_modules`` are then checked against it now instead of failing the job later."""
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        if method not in METHODS:
            raise InvalidJobError(f"method must be one of {', '.join(METHODS)}, got {method!r}", param="method")
        if promote not in PROMOTE_MODES:
            raise InvalidJobError(f"promote must be one of {', '.join(PROMOTE_MODES)}, got {promote!r}",
                                  param="promote")
        hp = dict(hyperparameters or {})
        # a bad value is a client error now, not a failed job later
        targets = Hyperparameters.from_dict(hp).target_modules
        if spec is not None and isinstance(targets, tuple):
            check_target_modules(spec, targets, param="hyperparameters.target_modules", error=HyperparameterError)
        job_id = new_id("ftjob")
        prefix = f"tenants/{tenant}/jobs/{job_id}"
        train_key, val_key = f"{prefix}/train.jsonl", f"{prefix}/validation.jsonl" if validation else None
        # Data first, row second: a job row never points at missing data.
        self.store.put(train_key, dataset_to_jsonl(training))
        if validation is not None and val_key:
            self.store.put(val_key, dataset_to_jsonl(validation))
        now = self.now()
        summary = {
            "training_examples": len(training), "validation_examples": len(validation) if validation else None,
            "labels": list(training.labels), "duplicates_dropped": training.duplicates_dropped,
        }
        job = dict(
            id=job_id, tenant=tenant, adapter=adapter, status=QUEUED,
            method=method, promote=promote, hyperparameters=hp, resolved_hyperparameters=None,
            training_key=train_key, validation_key=val_key, training_file=training_file,
            validation_file=validation_file, dataset=summary, progress={}, metrics={}, result={},
            cancel_requested=0, attempts=0, created_at=now, updated_at=now,
        )
        note = f"job created: {len(training)} training examples, {len(training.labels)} labels, method {method}"
        try:
            transaction(self.db, lambda conn: _insert(conn, job, note))
        except BaseException:
            self.store.delete_prefix(prefix + "/")
            raise
        self._note_queued(job_id)
        return self.get(tenant, job_id)

    def get(self, tenant: str, job_id: str) -> Job:
        validate_name(tenant, "tenant")
        with self._read.connect() as conn:
            row = conn.execute(select(J).where(J.c.id == _job_id(job_id), J.c.tenant == tenant)).mappings().first()
            if row is None:
                raise NotFoundError(f"job {job_id!r} not found", param="job")
            positions = _positions(conn) if row["status"] == QUEUED else {}
        return _job(row, positions.get(row["id"]))

    def list(self, tenant: str, *, limit: int = 20, status: str | None = None) -> list[Job]:
        validate_name(tenant, "tenant")
        q = select(J).where(J.c.tenant == tenant)
        if status is not None:
            q = q.where(J.c.status == status)
        with self._read.connect() as conn:
            rows = conn.execute(q.order_by(J.c.created_at.desc(), J.c.id).limit(max(1, min(limit, 100)))).mappings().all()
            positions = _positions(conn) if any(r["status"] == QUEUED for r in rows) else {}
            return [_job(r, positions.get(r["id"])) for r in rows]

    def events(self, tenant: str, job_id: str, *, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        self.get(tenant, job_id)  # ownership check
        E = schema.job_events
        with self._read.connect() as conn:
            rows = conn.execute(
                select(E).where(E.c.job_id == job_id, E.c.id > after).order_by(E.c.id).limit(limit)
            ).mappings()
            return [JobEvent(id=r["id"], at=r["at"], level=r["level"], type=r["type"], message=r["message"],
                             data=r["data"]) for r in rows]

    def cancel(self, tenant: str, job_id: str) -> Job:
        job = self.get(tenant, job_id)
        transaction(self.db, lambda conn: _cancel(conn, job.id, self.now()))
        return self.get(tenant, job_id)

    def count_by_status(self) -> dict[str, int]:
        with self._read.connect() as conn:
            return {s: n for s, n in conn.execute(select(J.c.status, func.count()).group_by(J.c.status))}

    def durations(self, bounds: Sequence[float]) -> list[JobDurations]:
        """Run time of every finished job that started, by status, counted in SQL (one query)."""
        secs = _run_seconds(self._read.dialect.name)
        query = (select(J.c.status, func.count(), func.coalesce(func.sum(secs), 0.0),
                        *(func.sum(case((secs <= b, 1), else_=0)) for b in bounds))
                 .where(J.c.status.in_(FINISHED), J.c.started_at.is_not(None), J.c.finished_at.is_not(None))
                 .group_by(J.c.status))
        with self._read.connect() as conn:
            return [JobDurations(status, int(n), float(total), tuple(int(c or 0) for c in counts))
                    for status, n, total, *counts in conn.execute(query)]

    # -- worker side ----------------------------------------------------------------------

    def claim(self, worker_id: str) -> Job | None:
        """Hand ``worker_id`` a queued job (status ``validating``), or None when none may run.

        The job is the oldest queued job of the tenant first in ``fair_share.tenant_order``
        (least recently on a worker) that is under its ``max_concurrent_jobs``."""
        now = self.now()
        return transaction(self.db, lambda conn: self._claim(conn, worker_id, now))

    def _claim(self, conn: Connection, worker_id: str, now: datetime) -> Job | None:
        T = schema.tenants
        clocks = _clocks(conn)
        quotas = dict(conn.execute(select(T.c.id, T.c.quotas).where(T.c.id.in_(list(clocks)))).all()) \
            if clocks else {}
        for clock in fair_share.tenant_order(clocks.values()):
            limit = max(1, TenantQuotas.stored(quotas.get(clock.tenant_id)).max_concurrent_jobs)
            if clock.on_worker >= limit:
                continue
            # Claims of one tenant count its running jobs in turn, so two workers cannot both
            # take its last free slot (PostgreSQL). A tenant another claimer holds is left to
            # that claimer this round (SKIP LOCKED, so claims never deadlock): this claimer
            # serves the next tenant in fair order.
            if conn.execute(
                select(T.c.id).where(T.c.id == clock.tenant_id).with_for_update(key_share=True, skip_locked=True)
            ).first() is None:
                continue
            running = conn.execute(
                select(func.count()).select_from(J)
                .where(J.c.tenant_id == clock.tenant_id, J.c.status.in_((VALIDATING, RUNNING)))
            ).scalar_one()
            if running >= limit:
                continue
            cand = conn.execute(
                select(J.c.id).where(J.c.tenant_id == clock.tenant_id, J.c.status == QUEUED)
                .order_by(J.c.created_at, J.c.id).limit(1).with_for_update(skip_locked=True)
            ).first()
            if cand is None:
                continue
            done = conn.execute(update(J).where(J.c.id == cand.id, J.c.status == QUEUED).values(
                status=VALIDATING, worker_id=worker_id, lease_expires_at=now + self.lease,
                attempts=J.c.attempts + 1, started_at=func.coalesce(J.c.started_at, now), updated_at=now,
            ))
            if done.rowcount == 1:
                _event(conn, cand.id, "info", f"picked up by worker {worker_id}")
                row = conn.execute(select(J).where(J.c.id == cand.id)).mappings().one()
                return _job(row)
        return None

    def contender(self, job_id: str, *, grace_seconds: float = 0.0) -> Contender | None:
        """Whether ``job_id`` should give its worker back: the waiting tenant it would go to
        (another tenant with no job on a worker and a job queued for ``grace_seconds``), or None."""
        with self._read.connect() as conn:
            tenant_id = conn.execute(select(J.c.tenant_id).where(J.c.id == job_id)).scalar_one_or_none()
            if tenant_id is None:
                return None
            return fair_share.contender(_clocks(conn).values(), tenant_id, self.now(), grace_seconds)

    def release(self, job_id: str, worker_id: str, *, message: str) -> bool:
        """Give the worker back at a checkpoint: the job is ``queued`` again (same job, not
        failed; the claim it had is not counted as an attempt) and resumes from that checkpoint
        on whichever worker claims it next. ``message`` (the reason) and the job's new queue
        position go to its events. False, with nothing changed, when a cancel was requested
        meanwhile: the caller cancels the job instead. Raises ``LostJobError`` if not ours."""
        now = self.now()
        return transaction(self.db, lambda conn: _release(conn, job_id, worker_id, message, now))

    def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """Renew the lease; returns True if a cancel was requested. Raises if the job is lost."""
        return transaction(self.db, lambda conn: _heartbeat(conn, job_id, worker_id, self.now() + self.lease))

    def set_running(self, job_id: str, worker_id: str, resolved_hyperparameters: dict[str, Any],
                    dataset: dict[str, Any]) -> None:
        self._update(job_id, worker_id, status=RUNNING, resolved_hyperparameters=resolved_hyperparameters,
                     dataset=dataset)

    def progress(self, job_id: str, worker_id: str, progress: dict[str, Any]) -> None:
        self._update(job_id, worker_id, progress=progress)

    def event(self, job_id: str, level: str, message: str, *, data: dict[str, Any] | None = None,
              type: str = "message") -> None:
        transaction(self.db, lambda conn: _event(conn, job_id, level, message, data=data, type=type))

    def succeed(self, job_id: str, worker_id: str, *, version: int, metrics: dict[str, Any],
                result: dict[str, Any], message: str) -> None:
        self._finish(job_id, worker_id, SUCCEEDED, message, version=version, metrics=metrics, result=result)

    def fail(self, job_id: str, worker_id: str, code: str, message: str,
             metrics: dict[str, Any] | None = None) -> None:
        extra: dict[str, Any] = {"error_code": code, "error_message": message}
        if metrics is not None:
            extra["metrics"] = metrics
        self._finish(job_id, worker_id, FAILED, f"job failed: {message}", level="error", **extra)

    def mark_cancelled(self, job_id: str, worker_id: str) -> None:
        self._finish(job_id, worker_id, CANCELLED, "job cancelled; nothing was registered")

    def recover(self, *, is_dead: Callable[[str], bool] | None = None, max_attempts: int = 3) -> list[str]:
        """Requeue (or fail) jobs whose worker is gone; returns their ids."""
        now = self.now()
        return transaction(self.db, lambda conn: self._recover(conn, now, is_dead, max_attempts))

    def _recover(self, conn: Connection, now: datetime, is_dead: Callable[[str], bool] | None,
                 max_attempts: int) -> list[str]:
        touched = []
        # SKIP LOCKED: a job another supervisor is recovering (or a worker is updating right
        # now) is left alone this round.
        rows = conn.execute(
            select(J).where(J.c.status.in_((VALIDATING, RUNNING))).with_for_update(skip_locked=True)
        ).mappings().all()
        for row in rows:
            expired = row["lease_expires_at"] is None or row["lease_expires_at"] < now
            dead = expired or (is_dead is not None and row["worker_id"] and is_dead(row["worker_id"]))
            if not dead:
                continue
            if row["cancel_requested"]:
                values = {"status": CANCELLED, "finished_at": now}
                msg, level = "worker lost while cancelling; job cancelled", "warning"
            elif row["attempts"] >= max_attempts:
                values = {"status": FAILED, "finished_at": now, "error_code": "worker_lost",
                          "error_message": f"the training worker died {row['attempts']} times running this job"}
                msg, level = values["error_message"], "error"
            else:
                values = {"status": QUEUED}
                msg, level = "worker lost; job requeued and will resume from its last checkpoint", "warning"
            # Guarded by what we read: if the job changed hands meanwhile, leave it be.
            res = conn.execute(update(J).where(
                J.c.id == row["id"], J.c.status == row["status"], J.c.worker_id == row["worker_id"],
                J.c.attempts == row["attempts"],
            ).values(worker_id=None, lease_expires_at=None, released_at=now, updated_at=now, **values))
            if res.rowcount != 1:
                continue
            touched.append(row["id"])
            _event(conn, row["id"], level, msg)
            if values["status"] == QUEUED:
                _note_position(conn, row["id"])
        return touched

    # -- internals --------------------------------------------------------------------------

    def _note_queued(self, job_id: str) -> None:
        """Record a new job's queue position; the job exists already, so a failure here is logged."""
        try:
            transaction(self.db, lambda conn: _note_position(conn, job_id))
        except TailorError as e:
            log.warning("job %s: queue position not recorded (%s)", job_id, e)

    def _update(self, job_id: str, worker_id: str, **values: Any) -> None:
        transaction(self.db, lambda conn: _update_mine(conn, job_id, worker_id, updated_at=self.now(), **values))

    def _finish(self, job_id: str, worker_id: str, status: str, message: str, level: str = "info",
                **values: Any) -> None:
        now = self.now()
        values.update(status=status, finished_at=now, released_at=now, updated_at=now, lease_expires_at=None)
        transaction(self.db, lambda conn: _end(conn, job_id, worker_id, values, level, message))


class LostJobError(TailorError):
    """The worker no longer owns the job (its lease expired and it was recovered)."""

    code = "job_lost"


def _mine(job_id: str, worker_id: str) -> Any:
    return and_(J.c.id == job_id, J.c.worker_id == worker_id, or_(J.c.status == VALIDATING, J.c.status == RUNNING))


def _update_mine(conn: Connection, job_id: str, worker_id: str, **values: Any) -> None:
    """Update the job if ``worker_id`` still holds it, else raise ``LostJobError``."""
    if conn.execute(update(J).where(_mine(job_id, worker_id)).values(**values)).rowcount != 1:
        raise LostJobError(f"job {job_id} is no longer owned by worker {worker_id}")


def _heartbeat(conn: Connection, job_id: str, worker_id: str, lease_expires_at: datetime) -> bool:
    _update_mine(conn, job_id, worker_id, lease_expires_at=lease_expires_at)
    return bool(conn.execute(select(J.c.cancel_requested).where(J.c.id == job_id)).scalar_one())


def _release(conn: Connection, job_id: str, worker_id: str, message: str, now: datetime) -> bool:
    cancel = conn.execute(select(J.c.cancel_requested).where(_mine(job_id, worker_id)).with_for_update()) \
        .scalar_one_or_none()
    if cancel is None:
        raise LostJobError(f"job {job_id} is no longer owned by worker {worker_id}")
    if cancel:
        return False
    conn.execute(update(J).where(_mine(job_id, worker_id)).values(
        status=QUEUED, worker_id=None, lease_expires_at=None, released_at=now, updated_at=now,
        attempts=J.c.attempts - 1))
    _event(conn, job_id, "info", message)
    _note_position(conn, job_id)
    return True


def _end(conn: Connection, job_id: str, worker_id: str, values: dict[str, Any], level: str, message: str) -> None:
    _update_mine(conn, job_id, worker_id, **values)
    _event(conn, job_id, level, message)


def _event(conn: Any, job_id: str, level: str, message: str, *, data: dict[str, Any] | None = None,
           type: str = "message") -> None:
    conn.execute(insert(schema.job_events).values(job_id=job_id, at=utcnow(), level=level, type=type,
                                                  message=message, data=data))


def _insert(conn: Connection, job: dict[str, Any], note: str) -> None:
    """Queue ``job`` if its tenant's quotas allow one more (counted with the tenant row locked)."""
    # FOR NO KEY UPDATE: concurrent submits of one tenant count their active jobs in
    # turn (PostgreSQL); it does not block inserts that merely reference the tenant.
    tenant_row = conn.execute(
        select(schema.tenants.c.id, schema.tenants.c.quotas).where(schema.tenants.c.name == job["tenant"])
        .with_for_update(key_share=True)
    ).first()
    if tenant_row is None:
        raise NotFoundError(f"tenant {job['tenant']!r} not found", param="tenant")
    quotas = TenantQuotas.stored(tenant_row.quotas)
    active = conn.execute(
        select(func.count()).select_from(J).where(J.c.tenant_id == tenant_row.id, J.c.status.in_(ACTIVE))
    ).scalar_one()
    if active >= quotas.max_active_jobs:
        raise JobLimitError(
            f"tenant already has {active} active jobs; the quota is {quotas.max_active_jobs}. "
            "Wait for one to finish or cancel one.", param="adapter")
    enforce_job(conn, tenant_row.id, quotas, job["adapter"])  # adapters, versions, storage
    conn.execute(insert(J).values(tenant_id=tenant_row.id, **job))
    _event(conn, job["id"], "info", note)


def _cancel(conn: Connection, job_id: str, now: datetime) -> None:
    # Locked so a worker's claim and this cancel cannot interleave (PostgreSQL).
    status = conn.execute(select(J.c.status).where(J.c.id == job_id).with_for_update()).scalar_one()
    if status in FINISHED:
        raise ConflictError(f"job {job_id} already {status}", param="job")
    if status == QUEUED:  # nobody runs it: cancel at once
        conn.execute(update(J).where(J.c.id == job_id).values(
            status=CANCELLED, cancel_requested=1, finished_at=now, updated_at=now))
        _event(conn, job_id, "info", "job cancelled before it started")
    else:
        conn.execute(update(J).where(J.c.id == job_id).values(cancel_requested=1, updated_at=now))
        _event(conn, job_id, "info", "cancellation requested; the worker stops within seconds")


def _clocks(conn: Any) -> dict[int, TenantClock]:
    """Every tenant with queued jobs, with its fair-share clock (two grouped reads)."""
    heads = conn.execute(
        select(J.c.tenant_id, func.min(J.c.tenant), func.min(J.c.created_at),
               func.min(func.coalesce(J.c.released_at, J.c.created_at)))
        .where(J.c.status == QUEUED).group_by(J.c.tenant_id)
    ).all()
    if not heads:
        return {}
    on_worker = case((J.c.status.in_((VALIDATING, RUNNING)), 1), else_=0)
    usage = {tid: (int(n or 0), last) for tid, n, last in conn.execute(
        select(J.c.tenant_id, func.sum(on_worker), func.max(J.c.released_at))
        .where(J.c.tenant_id.in_([h[0] for h in heads])).group_by(J.c.tenant_id)
    )}
    return {
        tid: TenantClock(tenant_id=tid, tenant=name, on_worker=usage[tid][0], last_released=_utc(usage[tid][1]),
                         first_queued=_utc(first), waiting_since=_utc(since))
        for tid, name, first, since in heads
    }


def _utc(value: Any) -> Any:
    """Aggregates (min, max, coalesce) lose the column type on some backends: SQLite gives the
    stored text back, PostgreSQL an aware datetime; both become aware UTC datetimes."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(str(value)).replace(tzinfo=timezone.utc)


def _queue(conn: Any) -> list[QueuedJob]:
    clocks = _clocks(conn)
    if not clocks:
        return []
    jobs = [QueuedJob(id=i, tenant_id=t, created_at=_utc(c)) for i, t, c in conn.execute(
        select(J.c.id, J.c.tenant_id, J.c.created_at).where(J.c.status == QUEUED))]
    return fair_share.queue_order(jobs, clocks)


def _positions(conn: Any) -> dict[str, int]:
    return {job.id: i for i, job in enumerate(_queue(conn), start=1)}


def _note_position(conn: Any, job_id: str) -> None:
    queue = _queue(conn)
    index = next((i for i, j in enumerate(queue) if j.id == job_id), None)
    if index is None:
        return
    line = fair_share.describe_position(index + 1, queue[:index], queue[index].tenant_id)
    _event(conn, job_id, "info", line, data={"queue_position": index + 1})


def _job_id(value: object) -> str:
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise NotFoundError(f"job {str(value)[:60]!r} not found", param="job")
    return value


def _job(row: Any, queue_position: int | None = None) -> Job:
    error = JobError(row["error_code"], row["error_message"] or "") if row["error_code"] else None
    return Job(
        id=row["id"], tenant=row["tenant"], adapter=row["adapter"], status=row["status"], method=row["method"],
        promote=row["promote"], hyperparameters=row["hyperparameters"],
        resolved_hyperparameters=row["resolved_hyperparameters"], dataset=row["dataset"],
        progress=row["progress"], metrics=row["metrics"], result=row["result"], error=error,
        version=row["version"], training_file=row["training_file"], validation_file=row["validation_file"],
        attempts=row["attempts"], cancel_requested=bool(row["cancel_requested"]), created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], updated_at=row["updated_at"],
        training_key=row["training_key"], validation_key=row["validation_key"], worker_id=row["worker_id"],
        queue_position=queue_position if row["status"] == QUEUED else None,
    )
