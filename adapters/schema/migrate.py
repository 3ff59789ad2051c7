"""Running the schema migrations: ``create_schema`` brings a database to the newest revision.

The revisions are the Alembic scripts in ``adapters/migrations``; no alembic.ini is needed at
runtime (``alembic_config`` builds the configuration). Guarantees a caller may rely on:

* ``create_schema(engine)`` upgrades the database to the newest revision. It is safe to call
  from many processes at once (PostgreSQL: an advisory lock; SQLite: the write lock of
  ``BEGIN IMMEDIATE``), cheap when the schema is already current (once an engine of this
  process is known current, later calls ask nothing of the database), and adopts a database
  made before migrations existed (tables but no ``alembic_version``) by stamping it at revision
  ``0001`` and upgrading from there. A database at a revision this build does not know (made by
  a newer Tailor) is refused with a clear error rather than touched.
* It also installs the engine settings and error policy of ``adapters.schema.engine``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import Connection

from adapters.schema.engine import MIGRATION_LOCK_KEY, configure_engine, read_only, safe_url

log = logging.getLogger("tailor.schema")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
INITIAL_REVISION = "0001"

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
