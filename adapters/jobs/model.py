"""The records a job and an uploaded file are made of (what the API shows, plain data).

The one definition of a job's statuses, methods and promotion modes: ``service.schemas`` builds
the HTTP API's enums from these tuples, and the client and CLI read them from here (this module
imports nothing beyond the standard library and the task names of ``adapters.tasks``, so a
client stays light).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.tasks import TEXT_CLASSIFICATION  # a names-only module: no task code is imported

VALIDATING, QUEUED, RUNNING = "validating", "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (VALIDATING, QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
STATUSES = (*ACTIVE, *FINISHED)
METHODS = ("lora", "head")
PROMOTE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    adapter: str
    status: str
    method: str
    promote: str
    hyperparameters: dict[str, Any]
    resolved_hyperparameters: dict[str, Any] | None
    dataset: dict[str, Any]
    progress: dict[str, Any]
    metrics: dict[str, Any]
    result: dict[str, Any]
    error: JobError | None
    version: int | None
    training_file: str | None
    validation_file: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    task: str = TEXT_CLASSIFICATION  # the task kind of its data and of the version it makes
    # internal: where the data lives (and its sha256, None for jobs before tasks) and who runs it
    training_key: str = field(repr=False, default="")
    validation_key: str | None = field(repr=False, default=None)
    training_sha256: str | None = field(repr=False, default=None)
    validation_sha256: str | None = field(repr=False, default=None)
    worker_id: str | None = field(repr=False, default=None)
    # while queued: where the job stands in the fair-share order (1: the next a free worker takes)
    queue_position: int | None = None


@dataclass(frozen=True)
class JobDurations:
    """How long finished jobs of one status ran (started -> finished), as histogram counts."""

    status: str
    count: int
    total_seconds: float
    at_most: tuple[int, ...]  # jobs that took at most each bound, in the bounds' order


@dataclass(frozen=True)
class JobEvent:
    id: int
    at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    format: str
    rows: int
    labels: list[str]
    duplicates_dropped: int
    bytes: int
    created_at: datetime
    task: str = TEXT_CLASSIFICATION  # the task kind the dataset was validated for
    store_key: str = field(repr=False, default="")
    sha256: str = field(repr=False, default="")
