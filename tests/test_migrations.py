"""Schema migrations on SQLite and PostgreSQL: the revisions build exactly ``metadata``,
databases made before Alembic are adopted, concurrent starters do not trip over each other,
and a database from a newer build is refused untouched."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, insert, inspect, select, text

from adapters.registry import Registry
from adapters.schema import (
    MIGRATIONS_DIR, alembic_config, create_schema, current_revision, head_revision,
    make_engine, metadata, tenants,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("postgres_url"))


def differences(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)


def test_migrated_schema_matches_metadata(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        assert current_revision(engine) is None
        create_schema(engine)
        assert current_revision(engine) == head_revision()
        assert differences(engine) == []
        names = set(inspect(engine).get_table_names())
        assert set(metadata.tables) | {"alembic_version"} == names
    finally:
        engine.dispose()


def test_differences_are_detected(empty_url: str) -> None:
    """The comparison above can fail: a schema missing a column or a table is reported."""
    engine = make_engine(empty_url)
    try:
        create_schema(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE job_events"))
            conn.execute(text("ALTER TABLE files DROP COLUMN sha256"))
        diffs = [d if isinstance(d, tuple) else d[0] for d in differences(engine)]
        assert ("add_table", "job_events") in {(d[0], getattr(d[1], "name", None)) for d in diffs}
        assert ("add_column", "files", "sha256") in {(d[0], d[2], d[3].name) for d in diffs if d[0] == "add_column"}
    finally:
        engine.dispose()


def test_pre_alembic_database_is_stamped_and_upgraded(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        metadata.create_all(engine)  # how databases were made before migrations
        now = datetime.now(timezone.utc)
        with engine.begin() as conn:
            conn.execute(insert(tenants).values(name="acme", created_at=now, quotas={"max_adapters": 3}))
        assert current_revision(engine) is None
        reg = Registry(empty_url)  # adopts it: stamp at 0001, upgrade to head
        try:
            assert current_revision(engine) == head_revision()
            assert reg.get_tenant("acme").quotas == {"max_adapters": 3}
            reg.create_tenant("globex")
        finally:
            reg.close()
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_partial_pre_alembic_database_gets_its_missing_tables(tmp_path: Path) -> None:
    """An older build's database (no jobs tables yet) gains them instead of failing."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    try:
        old = [metadata.tables[n] for n in ("tenants", "adapters", "adapter_versions", "adapter_aliases",
                                            "alias_history", "changes")]
        metadata.create_all(engine, tables=old)
        create_schema(engine)
        assert current_revision(engine) == head_revision()
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_concurrent_starters(empty_url: str) -> None:
    """Several processes migrate one empty database at the same moment: all succeed, once."""
    script = (
        "import sys\n"
        "from adapters.schema import create_schema, make_engine\n"
        "e = make_engine(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # go: every process is past its imports now
        "create_schema(e)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, empty_url], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    engine = make_engine(empty_url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(text("alembic_version"))) == 1
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_database_from_a_newer_build_is_refused(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        create_schema(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
        other = make_engine(empty_url)  # a fresh process's engine: no cached "current"
        try:
            with pytest.raises(RuntimeError, match="f00dfeed9999.*newer Tailor"):
                create_schema(other)
        finally:
            other.dispose()
        with engine.connect() as conn:  # untouched
            assert conn.scalar(text("SELECT version_num FROM alembic_version")) == "f00dfeed9999"
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'down.db'}"
    engine = make_engine(url)
    try:
        create_schema(engine)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_migrations_ship_inside_the_package() -> None:
    """A regular (non-editable) install must carry the revisions and Alembic's files."""
    assert (MIGRATIONS_DIR / "env.py").is_file() and (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "versions" / "__init__.py").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"adapters.migrations" = ["script.py.mako", "alembic.ini"]' in pyproject


def test_upgrade_from_0002_keeps_rows_and_makes_them_text(empty_url: str) -> None:
    """0003 adds files.task and jobs.task: rows written before it are text-classification, and
    a writer that names no task still means text."""
    from adapters.schema import files, jobs

    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002")
        now = datetime.now(timezone.utc)
        file_row = dict(id="file-old", filename="old.jsonl", format="jsonl", rows=4, labels=["a", "b"],
                        duplicates_dropped=0, bytes=10, store_key="k", sha256="0" * 64)
        job_row = dict(id="ftjob-old", tenant="acme", adapter="sent", status="succeeded", method="lora",
                       promote="auto", hyperparameters={}, training_key="k", dataset={}, progress={},
                       metrics={}, result={}, cancel_requested=0, attempts=1)
        with engine.begin() as conn:  # the 0002 schema: no task column yet (Core names only given columns)
            tid = conn.execute(insert(tenants).values(name="acme", created_at=now, quotas={})).inserted_primary_key[0]
            conn.execute(insert(files).values(tenant_id=tid, created_at=now, **file_row))
            conn.execute(insert(jobs).values(tenant_id=tid, created_at=now, updated_at=now, **job_row))
        create_schema(engine)
        assert current_revision(engine) == head_revision()
        assert differences(engine) == []
        with engine.begin() as conn:
            assert conn.execute(select(files.c.id, files.c.task, files.c.rows)).all() == \
                [("file-old", "text-classification", 4)]
            assert conn.execute(select(jobs.c.id, jobs.c.task, jobs.c.status)).all() == \
                [("ftjob-old", "text-classification", "succeeded")]
            # a writer that names no task (every caller before tasks) still writes text
            conn.execute(insert(files).values(tenant_id=tid, created_at=now, **{**file_row, "id": "file-new"}))
            assert conn.scalar(select(files.c.task).where(files.c.id == "file-new")) == "text-classification"
    finally:
        engine.dispose()
