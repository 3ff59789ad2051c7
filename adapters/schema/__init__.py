"""Tailor's metadata database (SQLite or PostgreSQL): tables, engines, migrations, transactions.

One module per concern; each states its own contract:

* ``adapters.schema.tables`` -- every table (on one ``metadata``) and ``UTCDateTime``.
* ``adapters.schema.engine`` -- ``make_engine`` / ``configure_engine`` (connection settings),
  the error policy (an unreachable database is ``DatabaseUnavailableError``), ``read_only``
  views for pure reads, ``safe_url`` and ``lock_change_log``.
* ``adapters.schema.migrate`` -- ``create_schema``: the Alembic revisions of
  ``adapters/migrations``, safe from many processes at once.
* ``adapters.schema.transactions`` -- ``transaction``: the one retrying write transaction every
  writer uses (which errors rerun, how often, what the function passed in must allow).

Everything a caller needs is importable from here as well (``from adapters import schema``,
``schema.tenants``, ``from adapters.schema import make_engine``).
"""

from __future__ import annotations

from adapters.schema.engine import (
    CHANGE_LOG_LOCK_KEY,
    CONNECT_TIMEOUT_S,
    MIGRATION_LOCK_KEY,
    SQLITE_BUSY_TIMEOUT_S,
    configure_engine,
    configure_sqlite,
    database_url,
    is_unavailable,
    lock_change_log,
    make_engine,
    read_only,
    safe_url,
)
from adapters.schema.migrate import (
    INITIAL_REVISION,
    MIGRATIONS_DIR,
    alembic_config,
    create_schema,
    current_revision,
    head_revision,
)
from adapters.schema.tables import (
    UTCDateTime,
    adapter_aliases,
    adapter_versions,
    adapters,
    alias_history,
    api_keys,
    changes,
    files,
    job_events,
    jobs,
    metadata,
    tenants,
    utcnow,
)
from adapters.schema.transactions import WRITE_ATTEMPTS, transaction

__all__ = [
    "CHANGE_LOG_LOCK_KEY", "CONNECT_TIMEOUT_S", "INITIAL_REVISION", "MIGRATIONS_DIR",
    "MIGRATION_LOCK_KEY", "SQLITE_BUSY_TIMEOUT_S", "UTCDateTime", "WRITE_ATTEMPTS",
    "adapter_aliases", "adapter_versions", "adapters", "alembic_config", "alias_history",
    "api_keys", "changes", "configure_engine", "configure_sqlite", "create_schema",
    "current_revision", "database_url", "files", "head_revision", "is_unavailable", "job_events",
    "jobs", "lock_change_log", "make_engine", "metadata", "read_only", "safe_url", "tenants",
    "transaction", "utcnow",
]
