"""Store garbage collection, on SQLite and PostgreSQL with a real store: what a deletion during a
store outage or a crashed write leaves behind is collected after the grace period; nothing any
row refers to, nothing young and nothing under a tenant the database never knew is touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.datasets import DatasetLimits, from_records
from adapters.jobs import shared_checkpoints
from adapters.jobs.files import Files
from adapters.jobs.manager import JobManager
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.store_gc import collect
from adapters.synthetic import random_artifact
from tests.service_fixture import save_tiny_base

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"text": f"good {i}", "label": "pos"} for i in range(4)] + [
    {"text": f"bad {i}", "label": "neg"} for i in range(4)]
LATER = time.time() + 7 * 3600  # past the default grace period of every object written now


@pytest.fixture()
def world(tmp_path, database_url):
    registry = Registry(database_url)
    store = LocalStore(tmp_path / "store")
    spec = tiny_base(seed=3).spec
    w = type("World", (), {})()
    w.registry, w.store, w.spec = registry, store, spec
    w.db = registry.engine
    w.catalog = Catalog(registry, store)
    w.files = Files(w.db, store)
    w.jobs = JobManager(w.db, store)
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    return w


def publish(w, tenant: str, adapter: str, seed: int):
    return w.catalog.publish(tenant, adapter, random_artifact(w.spec, seed=seed), promote=True, spec=w.spec)


def test_leftovers_of_an_outage_go_and_everything_referenced_stays(world):
    w = world
    kept = publish(w, "acme", "a", 1)
    f = w.files.upload("acme", "rows.jsonl", "\n".join(json.dumps(r) for r in ROWS).encode(), limits=DatasetLimits())
    queued = w.jobs.submit("acme", "b", training=from_records(ROWS), validation=from_records(ROWS))
    running = w.jobs.submit("globex", "c", training=from_records(ROWS))
    assert w.jobs.claim("w1").id == queued.id and w.jobs.claim("w2").id == running.id
    live_ckpt = shared_checkpoints.prefix("globex", running.id) + "state.json"
    w.store.put(live_ckpt, b"{}")
    before = set(w.store.list())

    # globex is deleted while the store is down: its rows go, its bytes stay
    gone_version = publish(w, "globex", "doomed", 2)
    w.registry.delete_tenant("globex")  # what Catalog.delete_tenant did before its store call failed
    # a crash between an adapter delete's rows and bytes, and a checkpoint of a finished job
    dropped = publish(w, "acme", "dropped", 3)
    w.registry.delete_adapter("acme", "dropped")
    stale_ckpt = shared_checkpoints.prefix("acme", "ftjob-finished0000000000000000") + "state.json"
    w.store.put(stale_ckpt, b"{}")
    # a tenant name this database never had (another deployment's, or a wrong database)
    w.store.put("tenants/stranger/adapters/x/w.safetensors", b"theirs")

    leftovers = {gone_version.weights_key, gone_version.manifest_key, dropped.weights_key, dropped.manifest_key,
                 stale_ckpt, running.training_key, live_ckpt}
    assert leftovers >= {k for k in before if k.startswith("tenants/globex/")}
    report = collect(w.db, w.store, now=time.time())  # all of it is younger than the grace period
    assert report.deleted == [] and report.young == len(leftovers) and report.unknown_tenant == 1
    assert set(w.store.list()) >= leftovers

    dry = collect(w.db, w.store, now=LATER, dry_run=True)
    assert set(dry.deleted) == leftovers and dry.dry_run
    assert set(w.store.list()) >= leftovers  # a dry run deletes nothing

    report = collect(w.db, w.store, now=LATER)
    assert set(report.deleted) == set(dry.deleted) and report.bytes_freed > 0
    assert report.unknown_tenant == 1
    remaining = set(w.store.list())
    assert not remaining & set(report.deleted)
    assert not any(k.startswith("tenants/globex/") for k in remaining)
    # everything a row refers to is still there and readable
    for key in (kept.weights_key, kept.manifest_key, f.store_key, queued.training_key, queued.validation_key):
        assert key in remaining, key
    assert w.catalog.read(w.registry.resolve("acme", "a", kept.version)).manifest.labels
    assert "tenants/stranger/adapters/x/w.safetensors" in remaining
    # a second pass finds nothing more
    again = collect(w.db, w.store, now=LATER)
    assert again.deleted == [] and again.examined == len(remaining)


def test_checkpoints_of_unfinished_jobs_are_kept(world):
    w = world
    job = w.jobs.submit("acme", "b", training=from_records(ROWS))
    assert w.jobs.claim("w1").id == job.id
    key = shared_checkpoints.prefix("acme", job.id) + "adapter.safetensors"
    w.store.put(key, b"tensors")
    assert key not in collect(w.db, w.store, now=LATER).deleted and w.store.exists(key)
    w.jobs.fail(job.id, "w1", "boom", "exploded")
    assert collect(w.db, w.store, now=LATER).deleted == [key]  # finished: the copy is garbage now


def test_an_empty_or_wrong_database_deletes_nothing(world, tmp_path):
    w = world
    publish(w, "acme", "a", 1)
    stray = "tenants/acme/adapters/a/0123/adapter.safetensors"
    w.store.put(stray, b"unreferenced")
    empty = Registry(f"sqlite:///{tmp_path / 'empty.db'}")  # the same store, attached to a fresh database
    report = collect(empty.engine, w.store, now=LATER)
    assert report.deleted == [] and report.unknown_tenant == report.examined == 3
    assert collect(w.db, w.store, now=LATER).deleted == [stray]  # the right database knows acme


def test_grace_must_not_be_negative(world):
    with pytest.raises(ValueError):
        collect(world.db, world.store, grace_s=-1)


# -- where it runs: `tailor store gc` and, when idle, every training worker ----------------------

def home_with_leftovers(home: Path) -> tuple[Registry, LocalStore, list[str]]:
    """A TAILOR_HOME (default SQLite file and store) holding one live and one orphaned version."""
    home.mkdir(parents=True)
    registry, store = Registry(f"sqlite:///{home / 'tailor.db'}"), LocalStore(home / "store")
    spec = tiny_base(seed=3).spec
    catalog = Catalog(registry, store)
    registry.create_tenant("acme")
    catalog.publish("acme", "kept", random_artifact(spec, seed=1), promote=True, spec=spec)
    orphan = catalog.publish("acme", "gone", random_artifact(spec, seed=2), promote=True, spec=spec)
    registry.delete_adapter("acme", "gone")  # rows gone, bytes left: a delete during an outage
    return registry, store, [orphan.manifest_key, orphan.weights_key]


def running_until(p: subprocess.Popen[bytes], log: Path, deadline: float, done: Callable[[], bool]) -> None:
    """Wait for ``done()`` while the worker ``p`` stays alive; its log tail on failure."""
    while not done():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_tailor_store_gc(tmp_path, monkeypatch, capsys):
    from service.cli import main

    home = tmp_path / "home"
    registry, store, orphans = home_with_leftovers(home)
    monkeypatch.setenv("TAILOR_HOME", str(home))
    for var in ("TAILOR_DATABASE_URL", "TAILOR_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert main(["store", "gc"]) == 0  # the default grace period keeps what was just written
    assert json.loads(capsys.readouterr().out)["deleted"] == 0 and all(store.exists(k) for k in orphans)
    assert main(["store", "gc", "--dry-run", "--grace-hours", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and sorted(report["keys"]) == sorted(orphans) and all(store.exists(k) for k in orphans)
    assert main(["store", "gc", "--grace-hours", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deleted"] == 2 and report["bytes_freed"] > 0 and not any(store.exists(k) for k in orphans)
    assert registry.resolve("acme", "kept").version == 1 and len(store.list()) == 2

    monkeypatch.setenv("TAILOR_HOME", str(tmp_path / "elsewhere"))
    assert main(["store", "gc", "--grace-hours", "0"]) == 1
    assert "holds no Tailor registry" in capsys.readouterr().err
    assert main(["store", "gc", "--grace-hours", "-1"]) == 2


def test_an_idle_worker_collects_the_garbage(tmp_path):
    home = tmp_path / "home"
    registry, store, orphans = home_with_leftovers(home)
    model = save_tiny_base(tmp_path / "model", seed=3)
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "adapters.jobs.worker", "--database-url", f"sqlite:///{home / 'tailor.db'}",
           "--store-url", str(home / "store"), "--checkpoints", str(tmp_path / "ckpt"), "--base-model", str(model),
           "--threads", "1", "--poll-seconds", "0.1", "--gc-hours", "0.0005", "--gc-grace-hours", "0"]
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        running_until(p, log, deadline, lambda: not any(store.exists(k) for k in orphans))
        running_until(p, log, deadline, lambda: "store gc: 2 objects examined, 0 deleted" in log.read_text())
        assert p.poll() is None, log.read_text()[-3000:]  # still alive, the live version untouched
        assert registry.resolve("acme", "kept").version == 1 and len(store.list()) == 2
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    assert "store gc: 4 objects examined, 2 deleted" in log.read_text()


def test_tailor_worker_takes_its_gc_interval_from_the_settings(tmp_path):
    home = tmp_path / "home"
    _, store, orphans = home_with_leftovers(home)
    model = save_tiny_base(tmp_path / "model", seed=3)
    env = {**os.environ, "TAILOR_HOME": str(home), "TAILOR_BASE_MODEL": str(model), "TAILOR_TRAIN_THREADS": "1",
           "TAILOR_STORE_GC_HOURS": "0.0005", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("TAILOR_DATABASE_URL", "TAILOR_STORE_URL"):
        env.pop(var, None)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([str(Path(sys.executable).parent / "tailor"), "worker"], cwd=REPO, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
    try:
        running_until(p, log, time.monotonic() + 120, lambda: "store gc:" in log.read_text())
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    # its rounds ran, with the default grace period: the orphans, written just now, are kept
    assert "store gc: 4 objects examined, 0 deleted" in log.read_text()
    assert all(store.exists(k) for k in orphans)
