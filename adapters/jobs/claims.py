"""The worker side of the job lifecycle: claim under a lease, report, give back, end, recover.

``WorkerSide`` is the part of ``adapters.jobs.manager.JobManager`` that training workers and
supervisors call (the manager's docstring tells the whole lifecycle). Guarantees:

* ``claim`` hands one runnable queued job to exactly one worker, in one transaction (``FOR
  UPDATE SKIP LOCKED`` where the database has it), in fair-share order (``adapters.jobs.queue``)
  and within each tenant's ``max_concurrent_jobs``; the job is ``validating`` under a lease of
  ``lease`` from now.
* Every later write names the worker and applies only while the job is still that worker's
  (``validating`` or ``running`` under its id); otherwise it raises ``LostJobError`` and changes
  nothing, so a worker that lost its lease can never overwrite the job's fate.
* ``recover`` requeues (or fails, after ``max_attempts``) the jobs whose worker is gone, each
  once, guarded by what it read: never a job another worker has meanwhile claimed.
* Every write is one ``adapters.schema.transaction`` (rerun on a deadlock or serialization
  failure).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select, update

from adapters import schema
from adapters.errors import TailorError
from adapters.jobs import fair_share
from adapters.jobs.fair_share import Contender
from adapters.jobs.model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, VALIDATING, Job
from adapters.jobs.queue import note_position, tenant_clocks
from adapters.jobs.rows import J, add_event, job_record
from adapters.quotas import TenantQuotas
from adapters.schema import transaction


class LostJobError(TailorError):
    """The worker no longer owns the job (its lease expired and it was recovered)."""

    code = "job_lost"


class WorkerSide:
    """The worker-side calls of ``JobManager`` (which sets the attributes below)."""

    db: Engine
    _read: Engine
    now: Callable[[], datetime]
    lease: timedelta

    def claim(self, worker_id: str) -> Job | None:
        """Hand ``worker_id`` a queued job (status ``validating``), or None when none may run.

        The job is the oldest queued job of the tenant first in ``fair_share.tenant_order``
        (least recently on a worker) that is under its ``max_concurrent_jobs``."""
        now = self.now()
        return transaction(self.db, lambda conn: self._claim(conn, worker_id, now))

    def _claim(self, conn: Connection, worker_id: str, now: datetime) -> Job | None:
        T = schema.tenants
        waiting = tenant_clocks(conn)
        quotas = dict(conn.execute(select(T.c.id, T.c.quotas).where(T.c.id.in_(list(waiting)))).all()) \
            if waiting else {}
        for clock in fair_share.tenant_order(waiting.values()):
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
                add_event(conn, cand.id, "info", f"picked up by worker {worker_id}")
                row = conn.execute(select(J).where(J.c.id == cand.id)).mappings().one()
                return job_record(row)
        return None

    def contender(self, job_id: str, *, grace_seconds: float = 0.0) -> Contender | None:
        """Whether ``job_id`` should give its worker back: the waiting tenant it would go to
        (another tenant with no job on a worker and a job queued for ``grace_seconds``), or None."""
        with self._read.connect() as conn:
            tenant_id = conn.execute(select(J.c.tenant_id).where(J.c.id == job_id)).scalar_one_or_none()
            if tenant_id is None:
                return None
            return fair_share.contender(tenant_clocks(conn).values(), tenant_id, self.now(), grace_seconds)

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

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel of ``job_id`` was requested: a plain read, so it never waits behind
        writers (on SQLite, a busy worker's own event writes can hold the write lock that
        ``heartbeat`` needs for seconds at a time)."""
        with self._read.connect() as conn:
            return bool(conn.execute(select(J.c.cancel_requested).where(J.c.id == job_id)).scalar())

    def set_running(self, job_id: str, worker_id: str, resolved_hyperparameters: dict[str, Any],
                    dataset: dict[str, Any]) -> None:
        self._update(job_id, worker_id, status=RUNNING, resolved_hyperparameters=resolved_hyperparameters,
                     dataset=dataset)

    def progress(self, job_id: str, worker_id: str, progress: dict[str, Any]) -> None:
        self._update(job_id, worker_id, progress=progress)

    def event(self, job_id: str, level: str, message: str, *, data: dict[str, Any] | None = None,
              type: str = "message") -> None:
        transaction(self.db, lambda conn: add_event(conn, job_id, level, message, data=data, type=type))

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
            add_event(conn, row["id"], level, msg)
            if values["status"] == QUEUED:
                note_position(conn, row["id"])
        return touched

    def _update(self, job_id: str, worker_id: str, **values: Any) -> None:
        transaction(self.db, lambda conn: _update_mine(conn, job_id, worker_id, updated_at=self.now(), **values))

    def _finish(self, job_id: str, worker_id: str, status: str, message: str, level: str = "info",
                **values: Any) -> None:
        now = self.now()
        values.update(status=status, finished_at=now, released_at=now, updated_at=now, lease_expires_at=None)
        transaction(self.db, lambda conn: _end(conn, job_id, worker_id, values, level, message))


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
    add_event(conn, job_id, "info", message)
    note_position(conn, job_id)
    return True


def _end(conn: Connection, job_id: str, worker_id: str, values: dict[str, Any], level: str, message: str) -> None:
    _update_mine(conn, job_id, worker_id, **values)
    add_event(conn, job_id, level, message)
