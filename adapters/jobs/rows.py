"""Rows of the jobs tables as the job code uses them: a job row as a ``Job``, events, job ids.

* ``job_record(row, queue_position)`` builds a detached ``Job`` from a ``jobs`` row mapping;
  ``queue_position`` is kept only while the job is queued.
* ``checked_job_id(value)`` returns ``value`` if it is a well-formed job id; anything else is
  ``NotFoundError``, as for a job that does not exist, and never reaches SQL.
* ``add_event(conn, job_id, level, message)`` appends to the job's event log, stamped now,
  inside the caller's transaction.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, insert

from adapters import schema
from adapters.errors import NotFoundError
from adapters.jobs.model import QUEUED, Job, JobError
from adapters.schema import utcnow

J = schema.jobs
_JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")


def add_event(conn: Connection, job_id: str, level: str, message: str, *, data: dict[str, Any] | None = None,
           type: str = "message") -> None:
    conn.execute(insert(schema.job_events).values(job_id=job_id, at=utcnow(), level=level, type=type,
                                                  message=message, data=data))


def checked_job_id(value: object) -> str:
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise NotFoundError(f"job {str(value)[:60]!r} not found", param="job")
    return value


def job_record(row: Any, queue_position: int | None = None) -> Job:
    error = JobError(row["error_code"], row["error_message"] or "") if row["error_code"] else None
    return Job(
        id=row["id"], tenant=row["tenant"], adapter=row["adapter"], status=row["status"], method=row["method"],
        promote=row["promote"], hyperparameters=row["hyperparameters"],
        resolved_hyperparameters=row["resolved_hyperparameters"], dataset=row["dataset"],
        progress=row["progress"], metrics=row["metrics"], result=row["result"], error=error,
        version=row["version"], training_file=row["training_file"], validation_file=row["validation_file"],
        attempts=row["attempts"], cancel_requested=bool(row["cancel_requested"]), created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], updated_at=row["updated_at"],
        task=row["task"], training_key=row["training_key"], validation_key=row["validation_key"],
        training_sha256=row["training_sha256"], validation_sha256=row["validation_sha256"],
        worker_id=row["worker_id"],
        queue_position=queue_position if row["status"] == QUEUED else None,
    )
