"""The job lifecycle, kept entirely in the registry database so it survives restarts.

API side: ``submit`` (the dataset was validated before; the job starts ``queued``; its task is
its training data's, and an adapter keeps one task: ``adapters.jobs.adapter_tasks``), ``get``,
``list``, ``events``, ``cancel``. Worker side: ``claim`` hands one runnable queued job to
exactly one worker (one transaction; ``FOR UPDATE SKIP LOCKED`` where the database has it)
under a lease, honouring each tenant's ``max_concurrent_jobs``; which job is the fair-share
rule of ``adapters.jobs.fair_share`` (tenants take turns by how recently they last had a
worker; a tenant's jobs in submit order). The worker then reports progress and events, renews
its lease with ``heartbeat`` (which also tells it whether a cancel was requested;
``cancel_requested`` asks that without writing, so a busy database cannot delay it), asks
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

``JobManager`` is the API side, here, on top of ``adapters.jobs.claims.WorkerSide`` (claims,
leases, recovery); ``adapters.jobs.queue`` reads the queue in fair-share order and
``adapters.jobs.rows`` maps rows to ``Job`` records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, case, func, insert, select, update

from adapters import schema
from adapters.errors import ConflictError, NotFoundError, TailorError
from adapters.fingerprint import BaseSpec
from adapters.import_checks import check_target_modules
from adapters.jobs import task_data
from adapters.jobs.adapter_tasks import AdapterTaskError, enforce_adapter_task, held_task
from adapters.jobs.claims import LostJobError, WorkerSide
from adapters.jobs.files import new_id
from adapters.jobs.model import (
    ACTIVE, CANCELLED, FINISHED, METHODS, PROMOTE_MODES, QUEUED, Job, JobDurations, JobEvent,
)
from adapters.jobs.queue import note_position, queue_positions
from adapters.jobs.rows import J, add_event, checked_job_id, job_record
from adapters.jobs.trainers import trainer_for
from adapters.names import validate_name
from adapters.quotas import TenantQuotas, enforce_job
from adapters.schema import read_only, transaction, utcnow
from adapters.store import AdapterStore
from adapters.training.hyperparams import HyperparameterError

__all__ = ["AdapterTaskError", "InvalidJobError", "JobLimitError", "JobManager", "LostJobError"]
log = logging.getLogger(__name__)


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


class JobManager(WorkerSide):
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
        self, tenant: str, adapter: str, *, training: Any, validation: Any = None,
        method: str = "lora", hyperparameters: dict[str, Any] | None = None, promote: str = "auto",
        training_file: str | None = None, validation_file: str | None = None, spec: BaseSpec | None = None,
        task: str | None = None,
    ) -> Job:
        """Queue a job training ``adapter`` on ``training`` (a validated dataset of any task:
        ``Files.load``'s, or ``from_records``'). The job's task is its training data's; ``task``,
        when given, must agree (e.g. for in-memory records); a validation set of another task is
        an ``InvalidJobError`` naming both. ``hyperparameters`` are the task's (``adapters.jobs.
        trainers``). ``spec``: the base model of the job's task, when the caller has it loaded;
        LoRA ``target_modules`` are then checked against it now instead of failing the job later
        (a spec of another task is not used)."""
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        task = _job_task(training, validation, task, training_file, validation_file)
        if method not in METHODS:
            raise InvalidJobError(f"method must be one of {', '.join(METHODS)}, got {method!r}", param="method")
        if promote not in PROMOTE_MODES:
            raise InvalidJobError(f"promote must be one of {', '.join(PROMOTE_MODES)}, got {promote!r}",
                                  param="promote")
        hp = dict(hyperparameters or {})
        # a bad value is a client error now, not a failed job later (the task's hyper-parameters)
        targets = trainer_for(task).parse(hp).target_modules
        if spec is not None and spec.task == task and isinstance(targets, tuple):
            check_target_modules(spec, targets, param="hyperparameters.target_modules", error=HyperparameterError)
        job_id = new_id("ftjob")
        prefix = f"tenants/{tenant}/jobs/{job_id}"
        train_key, val_key = f"{prefix}/train.jsonl", f"{prefix}/validation.jsonl" if validation else None
        # Data first, row second: a job row never points at missing data.
        train_sha = self.store.put(train_key, task_data.dump(task, training))
        val_sha = self.store.put(val_key, task_data.dump(task, validation)) if validation is not None and val_key \
            else None
        now = self.now()
        summary = {
            "training_examples": len(training), "validation_examples": len(validation) if validation else None,
            "labels": list(training.labels), "duplicates_dropped": training.duplicates_dropped,
        }
        job = dict(
            id=job_id, tenant=tenant, adapter=adapter, status=QUEUED, task=task,
            method=method, promote=promote, hyperparameters=hp, resolved_hyperparameters=None,
            training_key=train_key, validation_key=val_key, training_sha256=train_sha, validation_sha256=val_sha,
            training_file=training_file,
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

    def adapter_task(self, tenant: str, adapter: str, *, exclude_job: str | None = None) -> str | None:
        """The task of ``tenant``'s adapter (its versions', else an active job's); None if free."""
        found = held_task(self._read, tenant, adapter, exclude_job=exclude_job)
        return None if found is None else found[0]

    def check_adapter_task(self, job: Job) -> None:
        """``AdapterTaskError`` if ``job``'s adapter has meanwhile become another task's (e.g. a
        version imported while the job trained): the worker asks before it publishes."""
        with self._read.connect() as conn:
            tid = conn.scalar(select(schema.tenants.c.id).where(schema.tenants.c.name == job.tenant))
            if tid is not None:
                enforce_adapter_task(conn, tid, job.adapter, job.task, exclude_job=job.id)

    def get(self, tenant: str, job_id: str) -> Job:
        validate_name(tenant, "tenant")
        with self._read.connect() as conn:
            query = select(J).where(J.c.id == checked_job_id(job_id), J.c.tenant == tenant)
            row = conn.execute(query).mappings().first()
            if row is None:
                raise NotFoundError(f"job {job_id!r} not found", param="job")
            positions = queue_positions(conn) if row["status"] == QUEUED else {}
        return job_record(row, positions.get(row["id"]))

    def list(self, tenant: str, *, limit: int = 20, status: str | None = None) -> list[Job]:
        validate_name(tenant, "tenant")
        q = select(J).where(J.c.tenant == tenant)
        if status is not None:
            q = q.where(J.c.status == status)
        with self._read.connect() as conn:
            rows = conn.execute(q.order_by(J.c.created_at.desc(), J.c.id).limit(max(1, min(limit, 100)))).mappings().all()
            positions = queue_positions(conn) if any(r["status"] == QUEUED for r in rows) else {}
            return [job_record(r, positions.get(r["id"])) for r in rows]

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

    def _note_queued(self, job_id: str) -> None:
        """Record a new job's queue position; the job exists already, so a failure here is logged."""
        try:
            transaction(self.db, lambda conn: note_position(conn, job_id))
        except TailorError as e:
            log.warning("job %s: queue position not recorded (%s)", job_id, e)


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
    enforce_adapter_task(conn, tenant_row.id, job["adapter"], job["task"])  # one task per adapter
    enforce_job(conn, tenant_row.id, quotas, job["adapter"])  # adapters, versions, storage
    conn.execute(insert(J).values(tenant_id=tenant_row.id, **job))
    add_event(conn, job["id"], "info", note)


def _job_task(training: Any, validation: Any, task: str | None, training_file: str | None,
              validation_file: str | None) -> str:
    """The job's task: its training data's (which ``task``, when given, must be)."""
    have = task_data.task_of(training)
    if task is not None and task_data.task_name(task) != have:
        raise InvalidJobError(f"the training data is {have} data, but the job's task is {task_data.task_name(task)}",
                              param="task")
    if validation is not None and (other := task_data.task_of(validation)) != have:
        val = f"validation file {validation_file!r}" if validation_file else "validation data"
        train = f"training file {training_file!r}" if training_file else "training data"
        raise InvalidJobError(f"the {val} is {other} data but the {train} is {have} data; a job's "
                              "training and validation data must be of one task",
                              param="validation_file" if validation_file else "validation_data")
    return have


def _cancel(conn: Connection, job_id: str, now: datetime) -> None:
    # Locked so a worker's claim and this cancel cannot interleave (PostgreSQL).
    status = conn.execute(select(J.c.status).where(J.c.id == job_id).with_for_update()).scalar_one()
    if status in FINISHED:
        raise ConflictError(f"job {job_id} already {status}", param="job")
    if status == QUEUED:  # nobody runs it: cancel at once
        conn.execute(update(J).where(J.c.id == job_id).values(
            status=CANCELLED, cancel_requested=1, finished_at=now, updated_at=now))
        add_event(conn, job_id, "info", "job cancelled before it started")
    else:
        conn.execute(update(J).where(J.c.id == job_id).values(cancel_requested=1, updated_at=now))
        add_event(conn, job_id, "info", "cancellation requested; the worker stops within seconds")
