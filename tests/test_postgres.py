"""What the registry promises under concurrency and faults, on a real PostgreSQL server.

Job hand-out, per-tenant limits and the change log are exercised with many connections at
once (the races SQLite's single writer never shows); promotions made by another process must
reach a resolver within a second; and with the database gone, resident adapters keep
predicting while writes fail with ``database_unavailable`` — at the library level and through
the service's HTTP app, which also has to start while the database is still down.
"""

from __future__ import annotations

import collections
import logging
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.datasets import from_records
from adapters.errors import AdapterNotFoundError, DatabaseUnavailableError
from adapters.jobs.manager import JobManager
from adapters.keys import KeyStore
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.resolver import Resolver
from adapters.schema import changes, make_engine
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from tests.postgres import PostgresServer, PostgresUnavailable, new_server_dir, wait_until

REPO = Path(__file__).resolve().parents[1]
FP = "sha256:" + "c" * 64
DATA = [{"text": f"good {i}", "label": "pos"} for i in range(3)] + [
    {"text": f"bad {i}", "label": "neg"} for i in range(3)
]
TEXTS = ["good morning", "a dreadful film", "taxes and budgets"]


def add(reg: Registry, tenant: str, adapter: str, n: int) -> None:
    reg.add_version(tenant, adapter, weights_key=f"{tenant}/{adapter}/{n}/w", manifest_key=f"{tenant}/{adapter}/{n}/m",
                    sha256="a" * 64, nbytes=1, base_fingerprint=FP, manifest={})


def run_threads(n: int, target, *args) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i, *args)
        except BaseException as e:  # surfaced by the caller
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# -- the driver and types ----------------------------------------------------------------------


def test_postgresql_url_uses_psycopg_and_keeps_utc(postgres_migrated_url: str) -> None:
    # A session time zone far from UTC: stored and returned times must still be the same instant.
    engine = make_engine(postgres_migrated_url + "?options=-c%20timezone%3DAsia/Kolkata")
    assert engine.dialect.driver == "psycopg" and engine.pool._pre_ping
    reg = Registry.from_engine(engine)
    try:
        t = reg.create_tenant("acme", quotas={"max_adapters": 5, "nested": {"a": [1, 2.5, None]}})
        got = reg.get_tenant("acme")
        assert got == t and got.created_at.utcoffset().total_seconds() == 0
        assert got.quotas == {"max_adapters": 5, "nested": {"a": [1, 2.5, None]}}
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW timezone").scalar() == "Asia/Kolkata"
    finally:
        reg.close()


# -- job hand-out --------------------------------------------------------------------------------


def test_claims_are_exclusive_across_connections(postgres_migrated_url: str, tmp_path: Path) -> None:
    url = postgres_migrated_url
    reg = Registry(url)
    store = LocalStore(tmp_path / "store")
    jm = JobManager(reg.engine, store)
    ids = []
    for t in range(4):
        reg.create_tenant(f"t{t}", quotas={"max_concurrent_jobs": 50, "max_active_jobs": 50})
        ids += [jm.submit(f"t{t}", f"a{i}", training=from_records(DATA)).id for i in range(8)]
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(w: int) -> None:
        own = JobManager(make_engine(url), store)  # its own pool, as another process would have
        start.wait()
        while (job := own.claim(f"w{w}")) is not None:
            with lock:
                claimed.append(job.id)
            own.succeed(job.id, f"w{w}", version=1, metrics={}, result={}, message="done")
        own.db.dispose()

    assert run_threads(8, worker) == []
    assert collections.Counter(claimed) == collections.Counter(ids)  # each job once, none twice
    for t in range(4):
        for job in jm.list(f"t{t}", limit=100):
            assert job.status == "succeeded"
            assert sum("picked up" in e.message for e in jm.events(f"t{t}", job.id)) == 1
    reg.close()


def test_tenant_limit_holds_under_concurrent_claims(postgres_migrated_url: str, tmp_path: Path) -> None:
    """More queued jobs than one claim locks (50): two claimers see disjoint candidates and
    would both take the tenant's only slot without the tenant row lock."""
    url = postgres_migrated_url
    reg = Registry(url)
    store = LocalStore(tmp_path / "store")
    jm = JobManager(reg.engine, store)
    reg.create_tenant("acme", quotas={"max_concurrent_jobs": 1, "max_active_jobs": 100})
    for i in range(60):
        jm.submit("acme", f"a{i}", training=from_records(DATA))
    got: list[str] = []
    start = threading.Barrier(6)
    managers = [JobManager(make_engine(url), store) for _ in range(6)]

    def worker(w: int) -> None:
        start.wait()
        job = managers[w].claim(f"w{w}")
        if job is not None:
            got.append(job.id)

    for _ in range(3):
        assert run_threads(6, worker) == []
    assert len(got) == 1
    assert jm.count_by_status().get("validating") == 1
    for m in managers:
        m.db.dispose()
    reg.close()


# -- the change log ------------------------------------------------------------------------------


class SlowCommitRegistry(Registry):
    """Widens a real race: time passes between a change's insert and its commit (a slow
    network or disk), as it can in production, just more often."""

    @staticmethod
    def _log(conn, tenant, adapter, kind) -> None:  # type: ignore[no-untyped-def]
        Registry._log(conn, tenant, adapter, kind)
        time.sleep(random.uniform(0.0, 0.004))


def test_change_log_is_never_skipped_by_a_poller(postgres_migrated_url: str) -> None:
    """Writers commit in any order; a poller that follows ``change_seq`` (as the resolver does)
    must still read every change: seqs must become visible in order."""
    url = postgres_migrated_url
    setup = Registry(url)
    setup.create_tenant("acme")
    for i in range(6):
        add(setup, "acme", f"a{i}", 1)
    done = threading.Event()
    seen: set[int] = set()

    def poll(reg: Registry, last: int) -> int:
        seq = reg.change_seq()
        if seq != last:
            seen.update(c.seq for c in reg.changes_since(last, limit=10_000))
        return seq

    def poller() -> None:
        reg = Registry(url)
        last = 0
        while not done.is_set():
            last = poll(reg, last)
        poll(reg, last)
        reg.close()

    def writer(i: int, n: int) -> None:
        reg = SlowCommitRegistry(url)
        for _ in range(n):
            reg.set_alias("acme", f"a{i}", "prod", 1)
        reg.close()

    p = threading.Thread(target=poller)
    p.start()
    errors = run_threads(6, writer, 40)
    done.set()
    p.join()
    assert errors == []
    with setup.engine.connect() as conn:
        everything = set(conn.scalars(select(changes.c.seq)))
        assert conn.scalar(select(func.count()).select_from(changes)) == 6 * 40 + 7
    assert everything - seen == set()
    setup.close()


_REMOTE = """
import sys
from adapters.registry import Registry
reg = Registry(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "promote":
        reg.set_alias("acme", "s", "prod", int(arg[0]))
    elif cmd == "rollback":
        reg.rollback("acme", "s")
    elif cmd == "delete":
        reg.delete_adapter("acme", "s")
    print("ok", flush=True)
"""


def test_another_process_changes_reach_a_resolver_within_a_second(postgres_migrated_url: str) -> None:
    url = postgres_migrated_url
    reg = Registry(url)
    reg.create_tenant("acme")
    for n in (1, 2, 3):
        add(reg, "acme", "s", n)
    reg.set_alias("acme", "s", "prod", 1)
    resolver = Resolver(Registry(url), poll_seconds=0.25)
    assert resolver.resolve("acme", "s", None).version == 1
    proc = subprocess.Popen([sys.executable, "-c", _REMOTE, url], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""

        def current() -> int | None:
            try:
                return resolver.resolve("acme", "s", None).version
            except AdapterNotFoundError:
                return None

        for cmd, expected in (("promote 2", 2), ("promote 3", 3), ("rollback", 2), ("delete", None)):
            sent = time.monotonic()
            proc.stdin.write(cmd + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "ok\n"
            # Measured from before the command was sent: includes the other process's own work.
            took = wait_until(lambda: current() == expected, timeout=1.0)
            assert time.monotonic() - sent < 1.0, (cmd, took)
    finally:
        proc.stdin.close()
        proc.wait(30)
        resolver.registry.close()
        reg.close()


# -- faults: the database goes away ---------------------------------------------------------------


@pytest.fixture(scope="module")
def own_server() -> PostgresServer:
    """A server of these tests' own, free to stop and start (others use the session one).
    Each test starts or stops it as it needs; it is initialised but not running at first."""
    try:
        server = PostgresServer(new_server_dir())
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    yield server
    server.cleanup()


def test_outage_keeps_resident_adapters_serving_and_refuses_writes(own_server: PostgresServer,
                                                                    tmp_path: Path) -> None:
    if not own_server.running:
        own_server.start()
    url = own_server.create_database()
    base = tiny_base(seed=3)
    store = LocalStore(tmp_path / "store")
    catalog = Catalog(Registry(url), store)
    catalog.registry.create_tenant("acme")
    keys = KeyStore(catalog.registry.engine)
    _, secret = keys.create("acme")
    _, unseen = keys.create("acme")
    assert keys.authenticate(secret) == "acme"
    catalog.publish("acme", "s", random_artifact(base.spec, seed=1), promote=True, spec=base.spec)
    engine = Engine(base, catalog, EngineConfig(max_resident=8, device_slots=17, max_batch_size=16,
                                                resolve_poll_seconds=0.05))

    def predict() -> list[str]:
        loaded = engine.acquire(engine.resolve("acme", "s"))
        return [p.label for p in engine.classify(TEXTS, [loaded] * len(TEXTS))]

    before = predict()
    stored = sorted(store.list("tenants/acme/"))

    own_server.stop("immediate")  # a crash, as far as clients can tell
    wait_until(lambda: (predict(), engine.resolver.offline)[1], timeout=5.0)
    assert predict() == before  # resident adapter: still served, from the resolver's cache
    assert keys.authenticate(secret) == "acme"  # verified before the outage
    with pytest.raises(DatabaseUnavailableError) as err:
        keys.authenticate(unseen)  # cannot tell: 503, never a wrong 401
    assert err.value.code == "database_unavailable"
    with pytest.raises(DatabaseUnavailableError, match="unavailable"):
        catalog.registry.set_alias("acme", "s", "prod", 1)
    with pytest.raises(DatabaseUnavailableError):
        catalog.registry.rollback("acme", "s")
    with pytest.raises(DatabaseUnavailableError):
        engine.resolve("acme", "never-seen")
    with pytest.raises(DatabaseUnavailableError):
        catalog.publish("acme", "s", random_artifact(base.spec, seed=2), promote=True, spec=base.spec)
    assert sorted(store.list("tenants/acme/")) == stored  # the refused publish left no files
    late = Resolver(Registry(url, migrate=False), poll_seconds=0.05)  # a replica starting now
    assert late.offline

    own_server.start()
    other = Registry(url)  # another replica promotes v2 once the database is back
    v1 = other.resolve("acme", "s")
    other.add_version("acme", "s", weights_key=v1.weights_key, manifest_key=v1.manifest_key, sha256=v1.sha256,
                      nbytes=v1.nbytes, base_fingerprint=v1.base_fingerprint, manifest=v1.manifest)
    other.set_alias("acme", "s", "prod", 2)
    wait_until(lambda: engine.resolve("acme", "s").key.version == 2, timeout=5.0)
    assert not engine.resolver.offline
    assert late.resolve("acme", "s", None).version == 2 and not late.offline
    catalog.registry.set_alias("acme", "s", "prod", 1)  # the old pool reconnects by itself
    assert catalog.registry.resolve("acme", "s").version == 1
    other.close()
    late.registry.close()
    catalog.registry.close()


def test_service_starts_without_its_database_and_rides_out_an_outage(
    own_server: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The service's own state and HTTP app (in process: a ``bentoml serve`` start costs ~20 s
    more and adds nothing here; BentoML's ``/readyz`` is ``state.ready``)."""
    from fastapi.testclient import TestClient

    from adapters.base import load_base
    from adapters.peft_format import export_peft, zip_files
    from service.app import create_app
    from service.settings import Settings
    from service.state import TailorState
    from tests.service_fixture import ADMIN_KEY, save_tiny_base

    own_server.stop()
    initdb = threading.Thread(target=lambda: (own_server.data / "PG_VERSION").exists() or own_server.init())
    initdb.start()
    model_dir = save_tiny_base(tmp_path / "model")
    spec = load_base(str(model_dir)).spec
    db_url = own_server.url("tailor_service")
    settings = Settings.from_env({
        "TAILOR_HOME": str(tmp_path / "home"), "TAILOR_BASE_MODEL": str(model_dir), "TAILOR_ADMIN_KEY": ADMIN_KEY,
        "TAILOR_DATABASE_URL": db_url, "TAILOR_TRAIN_WORKERS": "0", "TAILOR_MAX_WAIT_MS": "2",
        "TAILOR_TASKS": "text-classification",
    })
    with caplog.at_level(logging.WARNING, logger="tailor.service"):
        state = TailorState.open(settings)  # does not fail, does not block
    assert f"registry database at {db_url} unreachable: " in caplog.text and "; retrying in 1s" in caplog.text
    state.db_retry_max_s = 0.5  # keep the test short (the default backs off to 30 s)
    state.start_loading()
    app = create_app(state)
    try:
        with TestClient(app) as http:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            r = http.get("/v1/tenants", headers=admin)
            assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
            assert "Retry-After" in r.headers and not state.ready

            initdb.join()
            own_server.start()
            own_server.create_database("tailor_service")
            wait_until(lambda: state.ready, timeout=60, interval=0.05)
            r = http.post("/v1/tenants", json={"name": "acme"}, headers=admin)
            assert r.status_code == 201, r.text
            tenant = {"Authorization": f"Bearer {r.json()['api_key']}"}
            for seed in (1, 2):
                data = zip_files(export_peft(random_artifact(spec, seed=seed, n_labels=2), spec))
                r = http.post("/v1/adapters/clf/import", files={"file": ("a.zip", data, "application/zip")},
                              data={"promote": "true" if seed == 1 else "false"}, headers=tenant)
                assert r.status_code == 201, r.text

            def predict() -> httpx.Response:
                return http.post("/v1/predict", json={"adapter": "clf", "inputs": TEXTS}, headers=tenant)

            before = predict().json()
            assert before["version"] == 1
            # the resolver catches up on the imports' changes in the background (Freshener): let it
            # see them now and resolve again, so what the outage finds cached is current
            resolver = state.engines["text-classification"].resolver
            resolver.refresh_ahead(float("inf"))
            assert predict().json() == before

            own_server.stop("fast")
            failed_polls = resolver.poll_failures

            def answered_from_memory() -> bool:
                """Predict (it must still be answered, as before); True once a poll has failed."""
                r = predict()
                assert r.status_code == 200 and r.json() == before, r.text
                return resolver.poll_failures > failed_polls

            # answered from the resident adapter until the resolver's poll (triggered by a predict
            # past the poll interval) has failed, and after that
            wait_until(answered_from_memory, timeout=30, interval=0.05)
            assert resolver.offline and answered_from_memory()
            r = http.post("/v1/adapters/clf/promote", json={"version": 2}, headers=tenant)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable" and "Retry-After" in r.headers

            own_server.start()
            r = http.post("/v1/adapters/clf/promote", json={"version": 2}, headers=tenant)
            assert r.status_code == 200, r.text
            wait_until(lambda: predict().json().get("version") == 2, timeout=5)
    finally:
        state.close()
