"""The queue of jobs waiting for a worker, as the database holds it, in fair-share order.

The order itself is the rule of ``adapters.jobs.fair_share``; this module reads what it needs
(two grouped reads for the tenants' clocks, one for the queued jobs), on the caller's
connection, so it sees the caller's transaction:

* ``tenant_clocks(conn)``: every tenant with a queued job, with its fair-share clock.
* ``queue_order(conn)``: the queued jobs in the order workers will take them.
* ``queue_positions(conn)``: each queued job's position (1: taken next).
* ``note_position(conn, job_id)``: records a queued job's position in its events (nothing for a
  job that is not queued).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, case, func, select

from adapters.jobs import fair_share
from adapters.jobs.fair_share import QueuedJob, TenantClock
from adapters.jobs.model import QUEUED, RUNNING, VALIDATING
from adapters.jobs.rows import J, add_event


def tenant_clocks(conn: Connection) -> dict[int, TenantClock]:
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


def queue_order(conn: Connection) -> list[QueuedJob]:
    """The queued jobs, in the order workers will take them."""
    clocks = tenant_clocks(conn)
    if not clocks:
        return []
    jobs = [QueuedJob(id=i, tenant_id=t, created_at=_utc(c)) for i, t, c in conn.execute(
        select(J.c.id, J.c.tenant_id, J.c.created_at).where(J.c.status == QUEUED))]
    return fair_share.queue_order(jobs, clocks)


def queue_positions(conn: Connection) -> dict[str, int]:
    return {job.id: i for i, job in enumerate(queue_order(conn), start=1)}


def note_position(conn: Connection, job_id: str) -> None:
    queue = queue_order(conn)
    index = next((i for i, j in enumerate(queue) if j.id == job_id), None)
    if index is None:
        return
    line = fair_share.describe_position(index + 1, queue[:index], queue[index].tenant_id)
    add_event(conn, job_id, "info", line, data={"queue_position": index + 1})
