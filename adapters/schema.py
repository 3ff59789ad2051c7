"""Shared SQL schema, engine setup and migrations for Tailor's metadata database.

Every table lives on the single ``metadata`` object here. Only SQLAlchemy Core is used, so the
same definitions run on ``sqlite:///...`` and ``postgresql://...``; the schema is built and
upgraded by the Alembic revisions in ``adapters/migrations`` (kept equal to ``metadata`` by
``tests/test_migrations.py``).

Guarantees a caller may rely on:

* ``make_engine(url)`` accepts ``sqlite:///path``, ``postgresql://...`` (mapped to the psycopg 3
  driver) and explicit ``dialect+driver://`` URLs. PostgreSQL engines ping pooled connections
  before use (a restarted server costs no failed request) and give up connecting after
  ``CONNECT_TIMEOUT_S``.
* SQLite connections use WAL, enforce foreign keys (so ``ON DELETE CASCADE`` works) and wait up
  to ``SQLITE_BUSY_TIMEOUT_S`` for locks, so several processes can share one database file.
  Every transaction opened on such an engine starts with ``BEGIN IMMEDIATE``: a read-then-write
  transaction takes the write lock up front instead of failing when it later upgrades.
  ``read_only(engine)`` gives a view of the same engine whose transactions use a plain deferred
  ``BEGIN``; use it for pure reads so they never queue behind writers.
* On every engine configured here (``make_engine`` or ``configure_engine``), a database that
  cannot be reached (refused or lost connection, server shutting down, SQLite file that cannot
  be opened or stays locked past the busy timeout) raises ``DatabaseUnavailableError`` (HTTP 503)
  instead of a driver error; the failed transaction was rolled back, so nothing is half-written.
  Other SQL errors (constraint violations, serialization failures) keep their SQLAlchemy types.
* ``create_schema(engine)`` upgrades the database to the newest revision. It is safe to call
  from many processes at once (PostgreSQL: an advisory lock; SQLite: the write lock of
  ``BEGIN IMMEDIATE``), cheap when the schema is already current, and adopts a database made
  before migrations existed (tables but no ``alembic_version``) by stamping it at revision
  ``0001`` and upgrading from there. A database at a revision this build does not know (made by
  a newer Tailor) is refused with a clear error rather than touched.
* ``UTCDateTime`` columns accept only timezone-aware datetimes and always give back aware UTC
  datetimes, on every backend.
* Surrogate ids on SQLite use AUTOINCREMENT, so an id (and a change ``seq``) is never reused
  after its row is deleted (PostgreSQL sequences never reuse values anyway).
"""

from __future__ import annotations

import logging
import threading
import weakref
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import URL, Connection, Dialect, ExceptionContext, make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.types import TypeDecorator

from adapters.errors import DatabaseUnavailableError

log = logging.getLogger("tailor.schema")

SQLITE_BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5
_READ_ONLY_OPTION = "tailor_read_only"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
INITIAL_REVISION = "0001"
# pg_advisory_xact_lock keys (any fixed 64-bit ints; only Tailor uses them in its database).
MIGRATION_LOCK_KEY = 0x7A11_0001
CHANGE_LOG_LOCK_KEY = 0x7A11_0002
# SQLSTATEs that mean "the server is not there for us" rather than "your statement is wrong":
# class 08 (connection exception), admin/crash shutdown, cannot connect now, too many clients.
_PG_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03", "53300")
_SQLITE_UNAVAILABLE = ("unable to open database", "disk i/o error", "database is locked")


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

def configure_engine(engine: Engine) -> None:
    """Install this module's connection settings and error translation on ``engine`` (idempotent)."""
    if not event.contains(engine, "handle_error", _translate_error):
        event.listen(engine, "handle_error", _translate_error)
    if engine.dialect.name == "sqlite" and not event.contains(engine, "connect", _sqlite_connect):
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)


configure_sqlite = configure_engine  # the older name, kept for callers


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take BEGIN away from the sqlite3 module so _sqlite_begin decides its kind.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get(_READ_ONLY_OPTION):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_unavailable(context: ExceptionContext) -> bool:
    """Whether a failed statement or connect means the database is out of reach."""
    if not isinstance(context.sqlalchemy_exception, (OperationalError, InterfaceError)):
        return False
    if context.is_disconnect:
        return True
    orig = context.original_exception
    if context.dialect.name == "postgresql":
        state = getattr(orig, "sqlstate", None)
        # No SQLSTATE: the client library itself failed (refused, reset, server gone).
        return state is None or state.startswith("08") or state in _PG_UNAVAILABLE_STATES
    if context.dialect.name == "sqlite":
        return any(s in str(orig).lower() for s in _SQLITE_UNAVAILABLE)
    return False


def _translate_error(context: ExceptionContext) -> BaseException | None:
    # The one place driver-level "database gone" errors become a 503 with a reason; SQLAlchemy
    # still does its cleanup (invalidating dead connections) before raising what we return.
    if context.is_pre_ping or not is_unavailable(context):
        return None  # a failed pre-ping is the pool's business: it reconnects
    reason = str(context.original_exception).strip().splitlines()
    return DatabaseUnavailableError(
        f"the registry database is unavailable: {reason[0] if reason else type(context.original_exception).__name__}"
    )


def database_url(url: str | URL) -> URL:
    """``url`` with the driver Tailor uses: plain ``postgresql://`` means psycopg 3."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def safe_url(url: str | URL) -> str:
    """``url`` without its password, for logs and error messages."""
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)


def make_engine(url: str | URL) -> Engine:
    """Create an engine for ``url`` with the settings above applied."""
    u = database_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        # Threads of one process share the pool; the busy timeout covers other processes.
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        if u.database not in (None, "", ":memory:"):
            # a serving process has ~16 request threads: keep their connections open rather
            # than reconnecting (and re-running the PRAGMAs) on every overflow
            kwargs.update(pool_size=16, max_overflow=16)
    elif u.get_backend_name() == "postgresql":
        # pre_ping: a pooled connection to a restarted server is replaced, not failed.
        kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=15)
        if "connect_timeout" not in u.query:
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    engine = create_engine(u, **kwargs)
    configure_engine(engine)
    return engine


def read_only(engine: Engine) -> Engine:
    """A view of ``engine`` (same pool) whose transactions are plain deferred reads."""
    return engine.execution_options(**{_READ_ONLY_OPTION: True})


def lock_change_log(conn: Connection) -> None:
    """Order change-log writers: call in a write transaction before inserting into ``changes``.

    On PostgreSQL, sequence values are handed out in one order and committed in another, so a
    poller could see seq 8 before 7 commits and skip 7 forever. Holding this lock from the
    insert to the commit makes seqs commit in order. SQLite's writers are serialised already.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_LOG_LOCK_KEY})


# -- migrations -------------------------------------------------------------------------------

# Engines of this process already at the head revision: later create_schema calls are free.
_current: weakref.WeakSet[Engine] = weakref.WeakSet()
_current_lock = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic ``Config`` on the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@cache
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: no ``alembic_version`` table or row)."""
    from alembic.migration import MigrationContext

    with read_only(engine).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def create_schema(engine: Engine) -> None:
    """Bring the database up to the newest schema revision (see the module docstring)."""
    configure_engine(engine)
    if engine in _current:
        return
    with _current_lock:  # threads of one process: one upgrade, the rest wait for it
        if engine in _current:
            return
        if current_revision(engine) != head_revision():
            _upgrade(engine)
        _current.add(engine)


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    # One transaction holds the lock for the whole check-and-upgrade. SQLite: BEGIN IMMEDIATE
    # takes the write lock (other starters wait on the busy timeout); PostgreSQL's DDL is
    # transactional and the advisory lock makes other starters wait, then find nothing to do.
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg = alembic_config(conn)
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None:
            try:
                ScriptDirectory.from_config(cfg).get_revision(current)
            except CommandError:
                raise RuntimeError(
                    f"the database {safe_url(engine.url)} is at schema revision {current!r}, which this "
                    f"build of Tailor does not know (its newest is {head_revision()!r}); run a newer Tailor"
                ) from None
        elif inspect(conn).has_table("tenants"):
            # Made by metadata.create_all before migrations: adopt it as revision 0001 (a
            # partial one, from an older build, lets 0001 create only what is missing).
            existing = set(inspect(conn).get_table_names())
            initial = {"tenants", "adapters", "adapter_versions", "adapter_aliases", "alias_history",
                       "changes", "api_keys", "files", "jobs", "job_events"}
            if initial <= existing:
                log.info("database %s predates migrations; stamping it at revision %s",
                         safe_url(engine.url), INITIAL_REVISION)
                command.stamp(cfg, INITIAL_REVISION)
            else:
                log.info("database %s predates migrations and lacks %s; creating them",
                         safe_url(engine.url), ", ".join(sorted(initial - existing)))
        command.upgrade(cfg, "head")
