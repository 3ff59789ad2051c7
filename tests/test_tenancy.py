"""Creating and deleting tenants in the library (``adapters.tenancy``), without HTTP.

Deletion: rows go (keys, adapters, files, jobs), then the store prefix, then this process's
caches; other tenants are untouched; an unknown tenant touches nothing; a crash after the rows
leaves bytes the store GC collects; a tenant's queued jobs vanish and a running job's worker
loses it and can register nothing. Real SQLite (and PostgreSQL where marked) and real files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from adapters import store_gc
from adapters.base import tiny_base
from adapters.catalog import Catalog, tenant_prefix
from adapters.change_listener import NO_LISTENER, ProcessCaches
from adapters.datasets import DatasetLimits, from_records
from adapters.errors import InvalidNameError, NotFoundError
from adapters.jobs import shared_checkpoints
from adapters.jobs.files import Files
from adapters.jobs.manager import JobManager, LostJobError
from adapters.key_cache import KeyCache
from adapters.keys import KeyStore
from adapters.quotas import QuotaError
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from adapters.tenancy import create_tenant, delete_tenant
from tests.training_data import FAST_HP, sentiment

ROWS = [{"text": f"good {i}", "label": "pos"} for i in range(5)] + [{"text": f"bad {i}", "label": "neg"}
                                                                      for i in range(5)]
SPEC = tiny_base(seed=1).spec


class World:
    def __init__(self, url: str, root: Path) -> None:
        self.registry = Registry(url)
        self.store = LocalStore(root / "store")
        self.catalog = Catalog(self.registry, self.store)
        self.keys = KeyStore(self.registry.engine)
        self.files = Files(self.registry.engine, self.store)
        self.jobs = JobManager(self.registry.engine, self.store)

    def populate(self, tenant: str) -> str:
        """A tenant with a key, an adapter of two versions, an uploaded file and a queued job."""
        secret = create_tenant(self.registry, self.keys, tenant).api_key
        self.catalog.publish(tenant, "clf", random_artifact(SPEC, seed=1), promote=True)
        self.catalog.publish(tenant, "clf", random_artifact(SPEC, seed=2))
        data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
        self.files.upload(tenant, "d.jsonl", data, limits=DatasetLimits())
        self.jobs.submit(tenant, "other", training=from_records(ROWS))
        return secret


@pytest.fixture()
def world(tmp_path: Path):
    w = World(f"sqlite:///{tmp_path / 'tailor.db'}", tmp_path)
    yield w
    w.registry.close()


def test_create_tenant_checks_name_and_quotas_before_writing(world: World) -> None:
    seq = world.registry.change_seq()
    with pytest.raises(InvalidNameError) as e:
        create_tenant(world.registry, world.keys, "Bad Name")
    assert e.value.param == "name"
    with pytest.raises(QuotaError) as q:
        create_tenant(world.registry, world.keys, "acme", {"max_adapters": -1})
    assert q.value.param == "quotas.max_adapters"
    assert world.registry.list_tenants() == [] and world.registry.change_seq() == seq
    new = create_tenant(world.registry, world.keys, "acme", {"max_adapters": 3})
    assert new.tenant.name == "acme" and new.tenant.quotas == {"max_adapters": 3}
    assert world.keys.authenticate(new.api_key) == "acme"
    assert [k.id for k in world.keys.list("acme")] == [new.key_id]


def test_delete_tenant_removes_its_rows_and_bytes_and_nothing_of_others(tmp_path: Path, database_url: str) -> None:
    w = World(database_url, tmp_path)
    try:
        acme, globex = w.populate("acme"), w.populate("globex")
        theirs = sorted(w.store.list("tenants/globex/"))
        ids = owned_ids(w.registry, "acme")
        owned = rows_owned(w.registry, ids)
        assert all(owned.values()), owned
        assert len(w.store.list("tenants/acme/")) == 6  # 2 versions x 2, a file, a job's data
        assert delete_tenant(w.catalog, "acme") == 6
        with pytest.raises(NotFoundError):
            w.registry.get_tenant("acme")
        assert w.keys.authenticate(acme) is None
        assert w.files.list("acme") == [] and w.jobs.list("acme") == []
        assert rows_owned(w.registry, ids) == dict.fromkeys(owned, 0)
        assert w.store.list(tenant_prefix("acme")) == []
        assert [c.kind for c in w.registry.changes_since(0) if c.tenant == "acme"][-1] == "tenant_deleted"
        # the other tenant keeps everything
        assert sorted(w.store.list("tenants/globex/")) == theirs
        assert w.keys.authenticate(globex) == "globex"
        assert w.registry.get_adapter("globex", "clf").versions == [1, 2]
        assert len(w.files.list("globex")) == 1 and len(w.jobs.list("globex")) == 1
        with pytest.raises(NotFoundError):  # once is all
            delete_tenant(w.catalog, "acme")
    finally:
        w.registry.close()


def tables(registry: Registry) -> dict[str, sa.Table]:
    meta = sa.MetaData()
    meta.reflect(registry.engine)  # the schema as the database has it
    return dict(meta.tables)


def owned_ids(registry: Registry, tenant: str) -> dict[str, list[Any]]:
    """The ids of a tenant's rows that other tables point at (nothing names them once it is gone)."""
    t = tables(registry)
    with registry.engine.connect() as conn:
        tid = conn.scalar(sa.select(t["tenants"].c.id).where(t["tenants"].c.name == tenant))
        return {"tenants": [tid],
                "adapters": list(conn.scalars(sa.select(t["adapters"].c.id).where(t["adapters"].c.tenant_id == tid))),
                "jobs": list(conn.scalars(sa.select(t["jobs"].c.id).where(t["jobs"].c.tenant_id == tid)))}


def rows_owned(registry: Registry, ids: dict[str, list[Any]]) -> dict[str, int]:
    """How many rows of each table belong to the tenant of ``ids``."""
    t = tables(registry)
    where = {"tenants": t["tenants"].c.id.in_(ids["tenants"]),
             "job_events": t["job_events"].c.job_id.in_(ids["jobs"])}
    where.update({name: t[name].c.tenant_id.in_(ids["tenants"]) for name in ("api_keys", "adapters", "files", "jobs")})
    where.update({name: t[name].c.adapter_id.in_(ids["adapters"])
                  for name in ("adapter_versions", "adapter_aliases", "alias_history")})
    with registry.engine.connect() as conn:
        return {name: conn.scalar(sa.select(sa.func.count()).select_from(t[name]).where(w))
                for name, w in where.items()}


class Told:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def adapter_changed(self, tenant: str, adapter: str) -> None:
        self.events.append(("changed", tenant, adapter))

    def adapter_deleted(self, tenant: str, adapter: str) -> None:
        self.events.append(("deleted", tenant, adapter))

    def tenant_deleted(self, tenant: str) -> None:
        self.events.append(("tenant_deleted", tenant))

    def key_revoked(self, tenant: str) -> None:
        self.events.append(("key_revoked", tenant))


def test_an_unknown_tenant_touches_nothing(world: World) -> None:
    world.store.put("tenants/ghost/stray", b"x")  # bytes under a name the database does not know
    told = Told()
    with pytest.raises(NotFoundError):
        delete_tenant(world.catalog, "ghost", listener=told)
    with pytest.raises(InvalidNameError):
        delete_tenant(world.catalog, "../etc", listener=told)
    assert world.store.list("tenants/ghost/") == ["tenants/ghost/stray"] and told.events == []


def test_deletion_tells_this_process_at_once(world: World) -> None:
    secret = world.populate("acme")
    frozen = [1000.0]
    key_cache = KeyCache(world.keys, world.registry, poll_seconds=1e9, clock=lambda: frozen[0])
    engine = Engine(tiny_base(seed=1), world.catalog,
                    EngineConfig(max_resident=4, device_slots=4, max_batch_size=2, resolve_poll_seconds=1e9))
    assert key_cache.authenticate(secret) == "acme"
    engine.acquire(engine.resolve("acme", "clf"))
    assert engine.resident("acme", "clf") is not None

    # without the listener this process would go on answering from memory until its next poll
    other = world.populate("globex")
    assert key_cache.authenticate(other) == "globex"
    delete_tenant(world.catalog, "globex", listener=NO_LISTENER)
    assert key_cache.authenticate(other) == "globex"

    delete_tenant(world.catalog, "acme", listener=ProcessCaches(engine=engine, key_cache=key_cache))
    assert key_cache.authenticate(secret) is None
    assert engine.resident("acme", "clf") is None
    with pytest.raises(NotFoundError):
        engine.resolve("acme", "clf")


def test_a_revoked_key_stops_working_in_this_process_at_once(world: World) -> None:
    from adapters.tenancy import revoke_key

    secret = world.populate("acme")
    spare = world.keys.create("acme")[1]
    key_cache = KeyCache(world.keys, world.registry, poll_seconds=1e9, clock=lambda: 1000.0)
    assert key_cache.authenticate(secret) == "acme" and key_cache.authenticate(spare) == "acme"
    first = next(k.id for k in world.keys.list("acme") if secret.startswith(k.prefix))
    second = next(k.id for k in world.keys.list("acme") if k.id != first)
    told = Told()
    revoke_key(world.keys, "acme", first, listener=told)
    assert told.events == [("key_revoked", "acme")]
    assert key_cache.authenticate(secret) == "acme"  # remembered: nothing told this cache
    revoke_key(world.keys, "acme", second, listener=ProcessCaches(key_cache=key_cache))
    assert key_cache.authenticate(secret) is None and key_cache.authenticate(spare) is None


def test_a_crash_after_the_rows_leaves_bytes_the_store_gc_collects(world: World) -> None:
    world.populate("acme")
    world.populate("globex")
    theirs = sorted(world.store.list("tenants/globex/"))
    world.registry.delete_tenant("acme")  # step 2 committed, then the process died
    assert len(world.store.list("tenants/acme/")) == 6
    report = store_gc.collect(world.registry.engine, world.store, grace_s=0)
    assert len(report.deleted) == 6 and world.store.list("tenants/acme/") == []
    assert sorted(world.store.list("tenants/globex/")) == theirs


def test_a_tenant_deleted_with_jobs_queued_and_running(world: World, tmp_path: Path) -> None:
    world.populate("acme")  # one queued job already
    queued = world.jobs.submit("acme", "clf", training=from_records(ROWS))
    running = world.jobs.claim("w1")
    assert running is not None and running.tenant == "acme" and running.id != queued.id
    world.jobs.set_running(running.id, "w1", {}, {})
    delete_tenant(world.catalog, "acme")

    with pytest.raises(NotFoundError):
        world.jobs.get("acme", queued.id)
    assert world.jobs.claim("w2") is None  # the queued jobs went with the rows
    with pytest.raises(LostJobError):  # the running job's worker stops at its next heartbeat
        world.jobs.heartbeat(running.id, "w1")
    with pytest.raises(LostJobError):  # and can record no outcome
        world.jobs.fail(running.id, "w1", "internal_error", "gone")
    with pytest.raises(NotFoundError):  # nor register an adapter: its bytes are removed again
        world.catalog.publish("acme", "clf", random_artifact(SPEC, seed=3))
    assert world.store.list("tenants/acme/") == []

    # a checkpoint the worker shares after the deletion: unreferenced, collected by the store GC
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in shared_checkpoints.FILES:
        (ckpt / name).write_bytes(b"{}")
    assert shared_checkpoints.share(world.store, "acme", running.id, ckpt)
    assert world.store.list("tenants/acme/")
    assert store_gc.collect(world.registry.engine, world.store, grace_s=0).deleted
    assert world.store.list("tenants/acme/") == []


class _DeletingCatalog(Catalog):
    """Deletes the tenant just before publishing: the window between a worker's last stop check
    and its publish, made certain."""

    def publish(self, tenant: str, *args: Any, **kwargs: Any) -> Any:
        delete_tenant(self, tenant)
        return super().publish(tenant, *args, **kwargs)


def test_a_worker_whose_tenant_is_deleted_before_publish_releases_the_job(world: World, tmp_path: Path) -> None:
    from adapters.jobs.runner import WorkerContext, run_job

    create_tenant(world.registry, world.keys, "acme")
    create_tenant(world.registry, world.keys, "other")
    world.jobs.submit("acme", "clf", training=from_records(sentiment(48)), hyperparameters=FAST_HP)
    job = world.jobs.claim("w1")
    assert job is not None
    base = tiny_base(seed=1)
    catalog = _DeletingCatalog(world.registry, world.store)
    ctx = WorkerContext(manager=world.jobs, catalog=catalog, trainer_base=base,
                        engine=Engine(tiny_base(seed=1), catalog, EngineConfig(device_slots=65)),
                        worker_id="w1", checkpoint_root=tmp_path / "ckpts")
    # NotFoundError from publish, then fail() finds the job gone: the job is released, the worker lives on
    assert run_job(job, ctx) == "released"
    assert world.store.list("tenants/acme/") == []
    assert [t.name for t in world.registry.list_tenants()] == ["other"]
