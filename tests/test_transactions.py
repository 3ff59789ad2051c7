"""``adapters.schema.transaction``, the one write path: what reruns, how often, and that every
writer (registry, API keys, files, jobs) goes through it.

A deadlock cannot be staged on demand without racing threads, so PostgreSQL is made to abort
the writer's own transaction the way its deadlock detector does: a trigger on the table the
writer changes raises SQLSTATE ``40P01`` (or ``40001``, a serialization failure) for the first
N statements. It counts with a sequence, which a rollback does not undo, so the test can read
how many times the write was tried. Everything else is a real database: no mocks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from adapters.datasets import DatasetLimits, from_records
from adapters.jobs.files import Files
from adapters.jobs.manager import JobManager
from adapters.keys import KeyStore
from adapters.registry import Registry
from adapters.schema import WRITE_ATTEMPTS, changes, tenants, transaction, utcnow
from adapters.store import LocalStore

FP = "sha256:" + "b" * 64
DATA = [{"text": f"good {i}", "label": "pos"} for i in range(5)] + [
    {"text": f"bad {i}", "label": "neg"} for i in range(5)
]


@dataclass
class World:
    reg: Registry
    keys: KeyStore
    files: Files
    jobs: JobManager

    @property
    def engine(self) -> Engine:
        return self.reg.engine


def make_world(url: str, tmp_path: Path) -> World:
    reg = Registry(url)
    store = LocalStore(tmp_path / "store")
    reg.create_tenant("acme")
    return World(reg, KeyStore(reg.engine), Files(reg.engine, store), JobManager(reg.engine, store))


@pytest.fixture()
def pg(postgres_migrated_url: str, tmp_path: Path):
    world = make_world(postgres_migrated_url, tmp_path)
    yield world
    world.reg.close()


def abort_writes(engine: Engine, table: str, times: int, sqlstate: str = "40P01") -> Callable[[], int]:
    """Make PostgreSQL abort the first ``times`` statements that write ``table`` with ``sqlstate``;
    returns a function that tells how many such statements were tried."""
    with engine.begin() as conn:
        conn.execute(text("CREATE SEQUENCE test_writes"))
        conn.execute(text(f"""
            CREATE FUNCTION test_abort() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('test_writes') <= {times} THEN
                    RAISE EXCEPTION 'aborted by the test' USING ERRCODE = '{sqlstate}';
                END IF;
                RETURN NULL;
            END $$"""))
        conn.execute(text(
            f"CREATE TRIGGER test_abort BEFORE INSERT OR UPDATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION test_abort()"
        ))

    def tried() -> int:
        with engine.connect() as conn:
            last, called = conn.execute(text("SELECT last_value, is_called FROM test_writes")).one()
        return int(last) if called else 0

    return tried


def change_kinds(w: World) -> list[str]:
    return [c.kind for c in w.reg.changes_since(0, limit=1000)]


def add_version(w: World, adapter: str = "sent") -> Any:
    n = len(change_kinds(w))
    return w.reg.add_version(
        "acme", adapter, weights_key=f"acme/{adapter}/{n}/w.safetensors",
        manifest_key=f"acme/{adapter}/{n}/manifest.json", sha256=f"{n:064x}", nbytes=10,
        base_fingerprint=FP, manifest={},
    )


# -- each writer: (table it writes, setup before the aborts, the write, its check) -----------


@dataclass(frozen=True)
class Writer:
    table: str
    write: Callable[[World, Any], Any]
    check: Callable[[World, Any, Any], None]
    setup: Callable[[World], Any] = lambda w: None


def _check_tenant(w: World, _: Any, t: Any) -> None:
    assert [x.name for x in w.reg.list_tenants()] == ["acme", "initech"] and t.name == "initech"
    assert change_kinds(w).count("tenant_created") == 2


def _check_version(w: World, _: Any, v: Any) -> None:
    # the aborted run's number allocation was rolled back with it: still version 1
    assert v.version == 1 and w.reg.get_adapter("acme", "sent").versions == [1]
    assert change_kinds(w).count("version_added") == 1


def _check_alias(w: World, _: Any, __: Any) -> None:
    assert w.reg.get_aliases("acme", "sent") == {"prod": 1}
    assert change_kinds(w).count("alias_set") == 1
    assert w.reg.alias_versions("acme", "sent") == {1}


def _check_key(w: World, _: Any, created: tuple[str, str]) -> None:
    assert [k.id for k in w.keys.list("acme")] == [created[0]]
    assert w.keys.authenticate(created[1]) == "acme"


def _check_revoked(w: World, key: tuple[str, str], revoked: Any) -> None:
    assert revoked.revoked_at is not None and w.keys.authenticate(key[1]) is None
    assert change_kinds(w).count("key_revoked") == 1


def _check_file(w: World, _: Any, rec: Any) -> None:
    assert [f.id for f in w.files.list("acme")] == [rec.id]
    assert len(w.files.load("acme", rec.id)[1]) == 10


def _submit(w: World, _: Any = None) -> Any:
    return w.jobs.submit("acme", "sent", training=from_records(DATA))


def _check_submitted(w: World, _: Any, job: Any) -> None:
    assert [j.id for j in w.jobs.list("acme")] == [job.id]
    messages = [e.message for e in w.jobs.events("acme", job.id)]
    assert sum(m.startswith("job created") for m in messages) == 1


def _check_claimed(w: World, job: Any, claimed: Any) -> None:
    assert claimed.id == job.id and claimed.attempts == 1
    assert sum("picked up" in e.message for e in w.jobs.events("acme", job.id)) == 1


def _claimed(w: World) -> Any:
    job = _submit(w)
    assert w.jobs.claim("w1") is not None
    return job


def _check_recovered(w: World, job: Any, touched: list[str]) -> None:
    # the aborted run's list of touched jobs is not carried into the rerun
    assert touched == [job.id]
    assert w.jobs.get("acme", job.id).status == "queued"
    assert sum("worker lost" in e.message for e in w.jobs.events("acme", job.id)) == 1


WRITERS = {
    "registry.create_tenant": Writer("tenants", lambda w, _: w.reg.create_tenant("initech"), _check_tenant),
    "registry.add_version": Writer("adapter_versions", lambda w, _: add_version(w), _check_version),
    "registry.set_alias": Writer(
        "adapter_aliases", lambda w, _: w.reg.set_alias("acme", "sent", "prod", 1), _check_alias,
        setup=add_version,
    ),
    "keys.create": Writer("api_keys", lambda w, _: w.keys.create("acme"), _check_key),
    "keys.revoke": Writer(
        "api_keys", lambda w, key: w.keys.revoke("acme", key[0]), _check_revoked,
        setup=lambda w: w.keys.create("acme"),
    ),
    "files.upload": Writer(
        "files",
        lambda w, _: w.files.upload(
            "acme", "d.jsonl", "\n".join(json.dumps(r) for r in DATA).encode(), limits=DatasetLimits()
        ),
        _check_file,
    ),
    "jobs.submit": Writer("jobs", _submit, _check_submitted),
    "jobs.claim": Writer("jobs", lambda w, _: w.jobs.claim("w1"), _check_claimed, setup=_submit),
    "jobs.recover": Writer(
        "jobs", lambda w, _: w.jobs.recover(is_dead=lambda worker: True), _check_recovered, setup=_claimed,
    ),
}


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
@pytest.mark.parametrize("name", list(WRITERS))
def test_a_write_aborted_by_the_database_is_rerun_once_and_takes_effect_once(pg: World, name: str,
                                                                            sqlstate: str) -> None:
    writer = WRITERS[name]
    context = writer.setup(pg)
    tried = abort_writes(pg.engine, writer.table, times=1, sqlstate=sqlstate)
    result = writer.write(pg, context)
    assert tried() == 2  # the aborted statement, then the rerun's
    writer.check(pg, context, result)


@pytest.mark.parametrize("name", ["registry.set_alias", "keys.create", "jobs.submit"])
def test_a_write_aborted_every_time_gives_up_after_the_last_attempt(pg: World, name: str) -> None:
    writer = WRITERS[name]
    context = writer.setup(pg)
    seq = pg.reg.change_seq()
    tried = abort_writes(pg.engine, writer.table, times=1000)
    with pytest.raises(OperationalError) as caught:
        writer.write(pg, context)
    assert getattr(caught.value.orig, "sqlstate", None) == "40P01"
    assert tried() == WRITE_ATTEMPTS
    assert pg.reg.change_seq() == seq  # nothing of any attempt was kept
    assert pg.keys.list("acme") == [] and pg.jobs.list("acme") == []
    assert pg.jobs.store.list("tenants/acme/") == []  # a job's data goes when its row cannot be written


# -- the helper itself, on both backends --------------------------------------------------------


@pytest.fixture()
def engine(database_url: str, tmp_path: Path):
    world = make_world(database_url, tmp_path)
    yield world.engine
    world.reg.close()


def _insert_tenant(runs: list[int], name: str) -> Callable[[Any], None]:
    def fn(conn: Any) -> None:
        runs.append(1)
        conn.execute(insert(tenants).values(name=name, created_at=utcnow(), quotas={}))
    return fn


def _tenant_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(tenants)))


def test_a_unique_clash_is_raised_at_once_unless_asked_to_rerun(engine: Engine) -> None:
    runs: list[int] = []
    with pytest.raises(IntegrityError):
        transaction(engine, _insert_tenant(runs, "acme"))  # "acme" exists
    assert len(runs) == 1
    runs.clear()
    with pytest.raises(IntegrityError):
        transaction(engine, _insert_tenant(runs, "acme"), rerun_on_clash=True)
    assert len(runs) == WRITE_ATTEMPTS
    assert _tenant_count(engine) == 1


def test_an_error_of_the_function_is_not_rerun_and_writes_nothing(engine: Engine) -> None:
    runs: list[int] = []

    def fn(conn: Any) -> None:
        _insert_tenant(runs, "initech")(conn)
        conn.execute(insert(changes).values(tenant="initech", kind="tenant_created", at=utcnow()))
        raise ValueError("refused after writing")

    with pytest.raises(ValueError):
        transaction(engine, fn, rerun_on_clash=True)
    assert len(runs) == 1 and _tenant_count(engine) == 1


def test_the_result_of_the_function_is_returned_and_committed(engine: Engine) -> None:
    runs: list[int] = []

    def fn(conn: Any) -> str:
        _insert_tenant(runs, "initech")(conn)
        return "done"

    assert transaction(engine, fn) == "done"
    assert runs == [1] and _tenant_count(engine) == 2
