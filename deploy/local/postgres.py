"""A PostgreSQL server on 127.0.0.1 for the local cluster and the tests.

Contract:

* ``PostgresServer(directory)`` runs Debian's PostgreSQL (``initdb`` + ``pg_ctl`` from
  ``/usr/lib/postgresql/<newest>/bin``, else from ``PATH``) with its data under ``directory``,
  listening on 127.0.0.1 at a free port (or the one given) and on a unix socket in
  ``directory``; trust authentication, user ``postgres``. Durability is switched off (fsync,
  synchronous commit): it is a development and test server. ``start``/``stop`` may be called
  repeatedly (same data, same port), which the fault tests use to take the database away.
* PostgreSQL refuses to run as root: when we are root, the server runs as the ``postgres``
  system user (``runuser``/``setpriv``) and ``directory`` is handed to it.
* ``start_postgres(directory) -> (url, stop)`` for scripts.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 60
_SERVER_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or no way to run them."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest Debian version first)."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for d in reversed(versions):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        # /usr/local/bin may hold symlinks into the Debian tree: follow them so the two match.
        return Path(os.path.realpath(initdb)).parent
    raise PostgresUnavailable(
        "PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on PATH); "
        "install Debian's 'postgresql' package (scripts/system-packages.sh does, as root)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> list[str]:
    """Prefix that runs a command as the server user (empty unless we are root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(_SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {_SERVER_USER!r} user to run PostgreSQL as") from None
    if shutil.which("runuser"):
        return ["runuser", "-u", _SERVER_USER, "--"]
    if shutil.which("setpriv"):
        pw = pwd.getpwnam(_SERVER_USER)
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    raise PostgresUnavailable("running as root and neither runuser nor setpriv is available")


@dataclass
class PostgresServer:
    directory: Path
    port: int = field(default_factory=free_port)
    bin_dir: Path = field(default_factory=find_bin_dir)
    _prefix: list[str] = field(default_factory=_run_as, repr=False)
    _dbs: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)
    _migrated_template: str | None = field(default=None, repr=False)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*self._prefix, str(self.bin_dir / tool), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}\n"
                               f"{self.log_tail()}")
        return res

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def init(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._prefix:
            pw = pwd.getpwnam(_SERVER_USER)
            os.chown(self.directory, pw.pw_uid, pw.pw_gid)
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                 "-E", "UTF8", "--locale=C")

    def start(self) -> str:
        if not (self.data / "PG_VERSION").exists():
            self.init()
        options = " ".join([
            "-c listen_addresses=127.0.0.1", f"-p {self.port}", f"-k {self.directory}",
            # A test server: no fsync (durability against OS crashes only costs time here), but
            # commits still reach the WAL before they return, so a server killed with
            # ``stop("immediate")`` keeps every committed transaction, as a real one would.
            "-c fsync=off", "-c full_page_writes=off",
            "-c max_connections=300",
        ])
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path), "-w",
                 "-t", str(START_TIMEOUT_S), "start")
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash as far as clients can tell)."""
        if (self.data / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """A new database (empty, or a copy of ``template``); returns its URL."""
        name = name or f"test_{next(self._dbs)}"
        self.sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def create_migrated_database(self) -> str:
        """A new database already at the newest schema revision (a copy of a migrated one)."""
        if self._migrated_template is None:
            from adapters.schema import create_schema, make_engine

            url = self.create_database("tailor_migrated_template")
            engine = make_engine(url)
            try:
                create_schema(engine)
            finally:
                engine.dispose()  # a template must have no open connections
            self._migrated_template = "tailor_migrated_template"
        return self.create_database(template=self._migrated_template)

    def drop_database(self, name: str) -> None:
        # FORCE: a test may leave pooled connections open.
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def new_server_dir() -> Path:
    """A fresh directory the server user can reach (pytest's tmp dirs are private to root)."""
    return Path(tempfile.mkdtemp(prefix="tailor-pg-"))


def start_postgres(directory: Path | None = None, port: int | None = None) -> tuple[str, Callable[[], None]]:
    """Start a throwaway server; returns ``(url, stop)``. ``stop`` also deletes its data."""
    server = PostgresServer(directory or new_server_dir(), **({"port": port} if port else {}))
    try:
        url = server.start()
    except BaseException:
        server.cleanup()
        raise
    return url, server.cleanup
