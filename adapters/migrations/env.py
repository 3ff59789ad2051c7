"""Alembic environment: runs on the connection ``adapters.schema.migrate.create_schema`` hands over.

There is no alembic.ini at runtime: the caller puts an open connection (already inside the
transaction that holds the migration lock) in ``config.attributes["connection"]``. Without one
(the ``alembic`` command line, e.g. ``alembic -c adapters/migrations/alembic.ini revision
--autogenerate``) it connects to ``sqlalchemy.url`` / ``$TAILOR_DATABASE_URL`` itself.
"""

from __future__ import annotations

import os

from alembic import context

from adapters.schema.engine import make_engine
from adapters.schema.tables import metadata

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place: later revisions use batch mode there.
        render_as_batch=True,
        compare_type=True,
    )
    # Inside the caller's transaction this opens none of its own (all or nothing).
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("TAILOR_DATABASE_URL")
    if not url:
        raise RuntimeError("set sqlalchemy.url or TAILOR_DATABASE_URL to run migrations by hand")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run them against a database")
run()
