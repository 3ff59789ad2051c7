"""A throwaway PostgreSQL server for tests (and for scripts that need one on 127.0.0.1).

Contract:

* ``PostgresServer(directory)`` runs Debian's PostgreSQL (``initdb`` + ``pg_ctl`` from
  ``/usr/lib/postgresql/<newest>/bin``, else from ``PATH``) with its data under ``directory``,
  listening on 127.0.0.1 at a free port (or the one given) and on a unix socket in
  ``directory``; trust authentication, user ``postgres``. fsync is off (a test server), but
  commits are in the WAL before they return, so a crash (``stop("immediate")``) loses none.
  ``start``/``stop`` may be called repeatedly (same data, same port), which the fault tests
  use to take the database away and back.
* PostgreSQL refuses to run as root: when we are root, the server runs as the ``postgres``
  system user (``runuser``/``setpriv``) and ``directory`` is handed to it.
* ``start_postgres(directory) -> (url, stop)`` is the same for callers outside pytest.
* ``postgres_server`` (session fixture) is one server for the whole run, stopped at the end;
  ``postgres_url`` (function fixture) is a fresh, empty database on it for each test.
  ``database_url`` is parametrized over ``sqlite`` and ``postgresql`` for tests that must pass
  on both; its PostgreSQL database is a copy of one migrated once per session (``CREATE
  DATABASE ... TEMPLATE``), which is several times faster than migrating each. Without
  PostgreSQL binaries the PostgreSQL cases skip and say why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.local.postgres import (  # noqa: F401 - re-exported for the tests
    PostgresServer, PostgresUnavailable, find_bin_dir, free_port, new_server_dir, start_postgres,
)


# -- pytest fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer(new_server_dir())
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    try:
        server.start()
    except Exception:
        server.cleanup()
        raise
    yield server
    server.cleanup()


def _database(server: PostgresServer, *, migrated: bool) -> Iterator[str]:
    if not server.running:  # a fault test stopped it and failed before restarting
        server.start()
    url = server.create_migrated_database() if migrated else server.create_database()
    yield url
    try:
        server.drop_database(url.rsplit("/", 1)[1])
    except Exception:  # noqa: BLE001 - cleanup of a throwaway server
        pass


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test."""
    yield from _database(postgres_server, migrated=False)


@pytest.fixture()
def postgres_migrated_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database for this test, already at the newest schema revision."""
    yield from _database(postgres_server, migrated=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a SQLite file and on a fresh (migrated) PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tailor.db'}"
    return str(request.getfixturevalue("postgres_migrated_url"))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; raises AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - t0
