"""The tables of Tailor's metadata database, and the UTC timestamp type they use.

Every table lives on the single ``metadata`` object here. Only SQLAlchemy Core is used, so the
same definitions run on SQLite and PostgreSQL. The Alembic revisions in ``adapters/migrations``
build and upgrade exactly this schema (``tests/test_migrations.py`` keeps the two equal): a
change here is a new revision there.

Guarantees a caller may rely on:

* ``UTCDateTime`` columns accept only timezone-aware datetimes and always give back aware UTC
  datetimes, on every backend.
* Surrogate ids on SQLite use AUTOINCREMENT, so an id (and a change ``seq``) is never reused
  after its row is deleted (PostgreSQL sequences never reuse values anyway).
* Rows that belong to a tenant go with it (``ON DELETE CASCADE``, which the engine settings of
  ``adapters.schema.engine`` turn on for SQLite too); the ``changes`` log outlives them.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from adapters.tasks import TEXT_CLASSIFICATION  # names only: importing it loads no task code


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime stored as UTC; refuses naive values, returns aware UTC values."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; pass an aware datetime")
        value = value.astimezone(timezone.utc)
        # SQLite's DATETIME text format has no offset: store the UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


metadata = MetaData()

# What rows written before tasks existed, and writers that name none, mean.
DEFAULT_TASK = TEXT_CLASSIFICATION

# sqlite_autoincrement: without it SQLite may hand a deleted max id to the next row, and a
# cache keyed by version id could then confuse two different versions.
tenants = Table(
    "tenants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("quotas", JSON, nullable=False),
    sqlite_autoincrement=True,
)

adapters = Table(
    "adapters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "tenant_id", Integer, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    Column("name", String(63), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Highest version number ever allocated: numbers are never reused after delete_version.
    Column("last_version", Integer, nullable=False, default=0),
    UniqueConstraint("tenant_id", "name", name="uq_adapters_tenant_name"),
    sqlite_autoincrement=True,
)

adapter_versions = Table(
    "adapter_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False
    ),
    Column("version", Integer, nullable=False),
    Column("weights_key", String(512), nullable=False),
    Column("manifest_key", String(512), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("nbytes", BigInteger, nullable=False),
    Column("base_fingerprint", String(128), nullable=False),
    Column("manifest", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("status", String(63), nullable=False, default="candidate"),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("adapter_id", "version", name="uq_adapter_versions_adapter_version"),
    sqlite_autoincrement=True,
)

adapter_aliases = Table(
    "adapter_aliases",
    metadata,
    Column(
        "adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False
    ),
    Column("alias", String(63), nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("adapter_id", "alias", name="pk_adapter_aliases"),
)

alias_history = Table(
    "alias_history",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False
    ),
    Column("alias", String(63), nullable=False),
    Column("version", Integer, nullable=False),
    Column("previous_version", Integer, nullable=True),
    # 'set' or 'rollback': rollback replays this log as an undo stack.
    Column("kind", String(16), nullable=False, default="set"),
    Column("at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)

changes = Table(
    "changes",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    # Plain text, not foreign keys: the log must outlive the rows it talks about.
    Column("tenant", Text, nullable=False),
    Column("adapter", Text, nullable=True),
    Column("kind", Text, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)


# -- tenants' API keys: only a hash is stored; the key itself is shown once ----------------
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

# -- uploaded training/validation files (validated at upload, bytes in the store) ----------
files = Table(
    "files",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("format", String(16), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("labels", JSON, nullable=False),
    Column("duplicates_dropped", Integer, nullable=False, default=0),
    Column("bytes", BigInteger, nullable=False),
    Column("store_key", String(512), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # the task kind the dataset was validated for (adapters.tasks)
    Column("task", String(32), nullable=False, server_default=DEFAULT_TASK),
)

# -- fine-tuning jobs: all state lives here so jobs survive restarts ------------------------
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("adapter", String(63), nullable=False),
    Column("status", String(16), nullable=False),
    Column("method", String(16), nullable=False),
    Column("promote", String(16), nullable=False),
    Column("hyperparameters", JSON, nullable=False),  # as requested ("auto" allowed)
    Column("resolved_hyperparameters", JSON, nullable=True),
    Column("training_key", String(512), nullable=False),  # normalised JSONL in the store
    Column("validation_key", String(512), nullable=True),
    # sha256 of the stored data, checked when a worker reads it (null: a job from before 0003)
    Column("training_sha256", String(64), nullable=True),
    Column("validation_sha256", String(64), nullable=True),
    Column("training_file", String(40), nullable=True),
    Column("validation_file", String(40), nullable=True),
    Column("dataset", JSON, nullable=False),  # counts, labels, duplicates dropped
    Column("progress", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("result", JSON, nullable=False),  # gate decision, version, ...
    Column("error_code", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("version", Integer, nullable=True),
    Column("cancel_requested", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker_id", String(128), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    # when the job last left a worker (yielded, requeued, finished): the fair-share clock
    Column("released_at", UTCDateTime, nullable=True),
    # the task kind of its data and of the adapter version it makes (adapters.tasks)
    Column("task", String(32), nullable=False, server_default=DEFAULT_TASK),
    Index("ix_jobs_status", "status"),
    Index("ix_jobs_tenant_released", "tenant_id", "released_at"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("at", UTCDateTime, nullable=False),
    Column("level", String(8), nullable=False),
    Column("type", String(16), nullable=False),  # "message" or "metrics"
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=True),
    sqlite_autoincrement=True,
)
