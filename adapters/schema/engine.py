"""Engines on Tailor's metadata database: connection settings, the error policy, read-only views.

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
* The error policy. On every engine configured here (``make_engine`` or ``configure_engine``), a
  database that cannot be reached (refused or lost connection, server shutting down, SQLite file
  that cannot be opened or stays locked past the busy timeout) raises
  ``DatabaseUnavailableError`` (HTTP 503) instead of a driver error; the failed transaction was
  rolled back, so nothing is half-written. Other SQL errors (constraint violations,
  serialization failures, deadlocks) keep their SQLAlchemy types: ``adapters.schema.transactions``
  reruns the ones a rerun can cure.
* ``lock_change_log(conn)`` makes change-log sequence numbers commit in order (see there).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, ExceptionContext, make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from adapters.errors import DatabaseUnavailableError

SQLITE_BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5
_READ_ONLY_OPTION = "tailor_read_only"
# pg_advisory_xact_lock keys (any fixed 64-bit ints; only Tailor uses them in its database).
MIGRATION_LOCK_KEY = 0x7A11_0001
CHANGE_LOG_LOCK_KEY = 0x7A11_0002
# SQLSTATEs that mean "the server is not there for us" rather than "your statement is wrong":
# class 08 (connection exception), admin/crash shutdown, cannot connect now, too many clients.
_PG_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03", "53300")
_SQLITE_UNAVAILABLE = ("unable to open database", "disk i/o error", "database is locked")


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
