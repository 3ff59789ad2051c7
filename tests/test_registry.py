"""Registry on a real SQLite file and a real PostgreSQL database: tenants, versions, aliases,
rollback, isolation, changes. Every test taking ``db_url`` or ``reg`` runs on both backends."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import threading
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from adapters.errors import AdapterNotFoundError, ConflictError, InvalidNameError, NotFoundError
from adapters.registry import AdapterInfo, Registry, Tenant, VersionRecord
from adapters.schema import adapter_aliases, adapter_versions, adapters, alias_history

REPO = Path(__file__).resolve().parents[1]
FP = "sha256:" + "b" * 64


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url  # parametrized over sqlite and postgresql (tests/postgres.py)


@pytest.fixture
def reg(db_url: str):
    r = Registry(db_url)
    yield r
    r.close()


@pytest.fixture
def sqlite_reg(tmp_path: Path):
    """For tests where the backend cannot matter (names and versions are checked before any
    query) or only SQLite needs them; one backend keeps the suite fast."""
    r = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    yield r
    r.close()


_serial = itertools.count(1)


def add(reg: Registry, tenant: str, adapter: str, **kw) -> VersionRecord:
    """Add a version with unique keys and sha256; ``kw`` overrides any field."""
    n = next(_serial)
    fields = dict(
        weights_key=f"{tenant}/{adapter}/{n}/adapter.safetensors",
        manifest_key=f"{tenant}/{adapter}/{n}/manifest.json",
        sha256=hashlib.sha256(str(n).encode()).hexdigest(),
        nbytes=1234,
        base_fingerprint=FP,
        manifest={"labels": ["neg", "pos"], "rank": 8},
    )
    fields.update(kw)
    return reg.add_version(tenant, adapter, **fields)


def _exists(reg: Registry, tenant: str, adapter: str) -> bool:
    try:
        reg.get_adapter(tenant, adapter)
        return True
    except AdapterNotFoundError:
        return False


# -- tenants ------------------------------------------------------------------------------


def test_tenant_crud(reg: Registry) -> None:
    t = reg.create_tenant("acme", quotas={"max_adapters": 5})
    assert isinstance(t, Tenant) and t.name == "acme" and t.quotas == {"max_adapters": 5}
    assert t.created_at.tzinfo is not None and t.created_at.utcoffset() == timezone.utc.utcoffset(None)
    got = reg.get_tenant("acme")
    assert got == t
    with pytest.raises(ConflictError, match="acme"):
        reg.create_tenant("acme")
    assert reg.ensure_tenant("acme") == t
    other = reg.ensure_tenant("beta")
    assert other.quotas == {}
    assert [x.name for x in reg.list_tenants()] == ["acme", "beta"]
    assert reg.delete_tenant("beta") == []
    with pytest.raises(NotFoundError):
        reg.get_tenant("beta")
    with pytest.raises(NotFoundError):
        reg.delete_tenant("beta")
    assert [x.name for x in reg.list_tenants()] == ["acme"]


def test_add_version_needs_tenant(reg: Registry) -> None:
    with pytest.raises(NotFoundError, match="tenant 'ghost'"):
        add(reg, "ghost", "a")


# -- versions -----------------------------------------------------------------------------


def test_version_numbering_and_records(reg: Registry) -> None:
    reg.create_tenant("acme")
    v1 = add(reg, "acme", "sentiment", metrics={"acc": 0.9})
    v2 = add(reg, "acme", "sentiment")
    other = add(reg, "acme", "topics")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.status == "candidate" and v1.metrics == {"acc": 0.9}
    assert v1.manifest == {"labels": ["neg", "pos"], "rank": 8}
    assert reg.get_version("acme", "sentiment", 1) == v1
    assert [v.version for v in reg.list_versions("acme", "sentiment")] == [1, 2]

    info = reg.get_adapter("acme", "sentiment")
    assert isinstance(info, AdapterInfo)
    assert info.versions == [1, 2] and info.aliases == {} and info.tenant == "acme"
    assert [a.name for a in reg.list_adapters("acme")] == ["sentiment", "topics"]

    # Numbers are never reused, even after the newest version is deleted.
    reg.delete_version("acme", "sentiment", 2)
    assert add(reg, "acme", "sentiment").version == 3
    assert reg.get_adapter("acme", "sentiment").versions == [1, 3]


def test_status_and_metrics(reg: Registry) -> None:
    reg.create_tenant("acme")
    add(reg, "acme", "a", metrics={"acc": 0.5, "loss": 1.0})
    reg.set_version_status("acme", "a", 1, "approved")
    merged = reg.update_metrics("acme", "a", 1, {"acc": 0.8, "f1": 0.7})
    assert merged.metrics == {"acc": 0.8, "loss": 1.0, "f1": 0.7}
    rec = reg.get_version("acme", "a", 1)
    assert rec.status == "approved" and rec.metrics == merged.metrics
    with pytest.raises(AdapterNotFoundError, match="no version 9"):
        reg.set_version_status("acme", "a", 9, "approved")
    with pytest.raises(InvalidNameError):
        reg.set_version_status("acme", "a", 1, "Approved!")


def test_add_version_validates_fields(reg: Registry) -> None:
    reg.create_tenant("acme")
    with pytest.raises(InvalidNameError):
        add(reg, "acme", "a", weights_key="../etc/passwd")
    with pytest.raises(ValueError):
        add(reg, "acme", "a", sha256="xyz")
    with pytest.raises(ValueError):
        add(reg, "acme", "a", nbytes=-1)
    assert not _exists(reg, "acme", "a")  # nothing half-written


def test_concurrent_add_version_threads(reg: Registry) -> None:
    reg.create_tenant("acme")
    errors: list[BaseException] = []
    got: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            start.wait()
            for j in range(5):
                rec = reg.add_version(
                    "acme", "shared",
                    weights_key=f"acme/shared/w{i}-{j}", manifest_key=f"acme/shared/m{i}-{j}",
                    sha256="a" * 64, nbytes=1, base_fingerprint=FP, manifest={},
                )
                with lock:
                    got.append(rec.version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(got) == list(range(1, 41))
    assert reg.get_adapter("acme", "shared").versions == list(range(1, 41))
    with reg.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(adapters)) == 1


def test_concurrent_add_version_processes(sqlite_reg: Registry) -> None:
    # SQLite only: to PostgreSQL another process is just more connections, which the threads
    # test above already opens (one per thread); SQLite's file locking needs real processes.
    reg = sqlite_reg
    db_url = str(reg.engine.url)
    reg.create_tenant("acme")
    script = (
        "import sys\n"
        "from adapters.registry import Registry\n"
        "r = Registry(sys.argv[1])\n"
        "for j in range(5):\n"
        "    r.add_version('acme', 'multi', weights_key=f'w{sys.argv[2]}-{j}',"
        " manifest_key=f'm{sys.argv[2]}-{j}', sha256='a' * 64, nbytes=1,"
        " base_fingerprint='fp', manifest={})\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, db_url, str(i)], cwd=REPO, stderr=subprocess.PIPE)
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    assert reg.get_adapter("acme", "multi").versions == list(range(1, 16))


# -- resolve ------------------------------------------------------------------------------


def test_resolve(reg: Registry) -> None:
    reg.create_tenant("acme")
    for _ in range(3):
        add(reg, "acme", "sentiment")
    reg.set_alias("acme", "sentiment", "prod", 2)
    reg.set_alias("acme", "sentiment", "canary", 3)
    assert reg.resolve("acme", "sentiment", 3).version == 3
    assert reg.resolve("acme", "sentiment", "3").version == 3
    assert reg.resolve("acme", "sentiment", "canary").version == 3
    assert reg.resolve("acme", "sentiment", None).version == 2
    assert reg.resolve("acme", "sentiment").version == 2
    assert reg.get_aliases("acme", "sentiment") == {"canary": 3, "prod": 2}

    with pytest.raises(AdapterNotFoundError, match="adapter 'sentiment' has no version 7"):
        reg.resolve("acme", "sentiment", 7)
    with pytest.raises(AdapterNotFoundError, match="adapter 'sentiment' has no version 7"):
        reg.resolve("acme", "sentiment", "7")
    with pytest.raises(AdapterNotFoundError, match="has no 'staging' alias"):
        reg.resolve("acme", "sentiment", "staging")
    with pytest.raises(AdapterNotFoundError, match="adapter 'nope' not found"):
        reg.resolve("acme", "nope")
    for bad in (0, -1, True, 2**40, "0", "9" * 40, 1.0, "../x", "PROD", "٣"):
        with pytest.raises(InvalidNameError):
            reg.resolve("acme", "sentiment", bad)  # type: ignore[arg-type]


def test_resolve_without_prod_never_falls_back(reg: Registry) -> None:
    reg.create_tenant("acme")
    add(reg, "acme", "a")
    reg.set_alias("acme", "a", "canary", 1)
    with pytest.raises(AdapterNotFoundError, match="adapter 'a' has no 'prod' alias"):
        reg.resolve("acme", "a")


def test_cross_tenant_isolation(reg: Registry) -> None:
    reg.create_tenant("a")
    reg.create_tenant("b")
    add(reg, "a", "secret")
    reg.set_alias("a", "secret", "prod", 1)
    for ref in (None, 1, "1", "prod"):
        with pytest.raises(AdapterNotFoundError) as info:
            reg.resolve("b", "secret", ref)
        assert str(info.value) == "adapter 'secret' not found"
    # A tenant that does not exist at all gets the very same answer.
    with pytest.raises(AdapterNotFoundError) as info:
        reg.resolve("ghost", "secret")
    assert str(info.value) == "adapter 'secret' not found"
    for call in (
        lambda: reg.get_version("b", "secret", 1),
        lambda: reg.list_versions("b", "secret"),
        lambda: reg.get_adapter("b", "secret"),
        lambda: reg.set_alias("b", "secret", "prod", 1),
        lambda: reg.delete_adapter("b", "secret"),
        lambda: reg.delete_version("b", "secret", 1),
        lambda: reg.update_metrics("b", "secret", 1, {"x": 1}),
    ):
        with pytest.raises(AdapterNotFoundError):
            call()
    assert reg.list_adapters("b") == []
    # b may have its own adapter of the same name, with its own numbering.
    assert add(reg, "b", "secret").version == 1
    assert reg.resolve("a", "secret").sha256 != reg.resolve("b", "secret", 1).sha256


# -- aliases and rollback -----------------------------------------------------------------


def test_set_alias_requires_existing_version(reg: Registry) -> None:
    reg.create_tenant("acme")
    add(reg, "acme", "a")
    with pytest.raises(AdapterNotFoundError, match="no version 2"):
        reg.set_alias("acme", "a", "prod", 2)
    with pytest.raises(InvalidNameError):
        reg.set_alias("acme", "a", "42", 1)  # would shadow version 42 in resolve
    assert reg.get_aliases("acme", "a") == {}


def test_rollback_walks_back(reg: Registry) -> None:
    reg.create_tenant("acme")
    for _ in range(4):
        add(reg, "acme", "a")
    with pytest.raises(AdapterNotFoundError, match="no 'prod' alias"):
        reg.rollback("acme", "a")
    reg.set_alias("acme", "a", "prod", 1)
    with pytest.raises(ConflictError, match="nothing to roll back to"):
        reg.rollback("acme", "a")
    reg.set_alias("acme", "a", "prod", 2)
    reg.set_alias("acme", "a", "prod", 2)  # no-op step, not a rollback target
    reg.set_alias("acme", "a", "prod", 3)
    assert reg.rollback("acme", "a") == 2
    assert reg.resolve("acme", "a").version == 2
    assert reg.rollback("acme", "a") == 1
    with pytest.raises(ConflictError, match="nothing to roll back to"):
        reg.rollback("acme", "a")
    assert reg.resolve("acme", "a").version == 1

    # A new promotion after rollbacks discards the undone steps.
    reg.set_alias("acme", "a", "prod", 4)
    assert reg.rollback("acme", "a") == 1
    with pytest.raises(ConflictError):
        reg.rollback("acme", "a")

    # History rows record what the alias pointed at before each change.
    with reg.engine.connect() as conn:
        rows = conn.execute(
            select(alias_history.c.kind, alias_history.c.version, alias_history.c.previous_version)
            .order_by(alias_history.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("set", 1, None), ("set", 2, 1), ("set", 2, 2), ("set", 3, 2),
        ("rollback", 2, 3), ("rollback", 1, 2), ("set", 4, 1), ("rollback", 1, 4),
    ]


def test_rollback_revisits_and_skips_deleted(reg: Registry) -> None:
    reg.create_tenant("acme")
    for _ in range(4):
        add(reg, "acme", "a")
    for v in (1, 2, 1, 3, 4):
        reg.set_alias("acme", "a", "prod", v)
    reg.delete_version("acme", "a", 3)
    assert reg.rollback("acme", "a") == 1  # 3 is gone: skipped
    assert reg.rollback("acme", "a") == 2
    assert reg.rollback("acme", "a") == 1
    with pytest.raises(ConflictError):
        reg.rollback("acme", "a")


def test_rollback_is_per_alias(reg: Registry) -> None:
    reg.create_tenant("acme")
    for _ in range(3):
        add(reg, "acme", "a")
    reg.set_alias("acme", "a", "prod", 1)
    reg.set_alias("acme", "a", "canary", 2)
    reg.set_alias("acme", "a", "canary", 3)
    reg.set_alias("acme", "a", "prod", 2)
    assert reg.rollback("acme", "a", "canary") == 2
    assert reg.get_aliases("acme", "a") == {"canary": 2, "prod": 2}
    assert reg.rollback("acme", "a") == 1


# -- deletion -----------------------------------------------------------------------------


def _count(reg: Registry, table) -> int:
    with reg.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)))


def test_delete_version(reg: Registry) -> None:
    reg.create_tenant("acme")
    v1 = add(reg, "acme", "a")
    add(reg, "acme", "a")
    reg.set_alias("acme", "a", "prod", 1)
    with pytest.raises(ConflictError, match="'prod'"):
        reg.delete_version("acme", "a", 1)
    reg.set_alias("acme", "a", "prod", 2)
    assert reg.delete_version("acme", "a", 1) == sorted([v1.weights_key, v1.manifest_key])
    with pytest.raises(AdapterNotFoundError, match="no version 1"):
        reg.get_version("acme", "a", 1)
    with pytest.raises(AdapterNotFoundError):
        reg.delete_version("acme", "a", 1)


def test_shared_keys_are_not_returned_while_in_use(reg: Registry) -> None:
    reg.create_tenant("acme")
    v1 = add(reg, "acme", "a", weights_key="blobs/same", manifest_key="acme/a/m1")
    add(reg, "acme", "a", weights_key="blobs/same", manifest_key="acme/a/m2")
    assert reg.delete_version("acme", "a", v1.version) == ["acme/a/m1"]
    assert reg.delete_adapter("acme", "a") == ["acme/a/m2", "blobs/same"]


def test_delete_adapter_cascades(reg: Registry) -> None:
    reg.create_tenant("acme")
    recs = [add(reg, "acme", "a") for _ in range(2)]
    keep = add(reg, "acme", "b")
    reg.set_alias("acme", "a", "prod", 1)
    reg.set_alias("acme", "a", "prod", 2)
    keys = reg.delete_adapter("acme", "a")
    assert keys == sorted(k for r in recs for k in (r.weights_key, r.manifest_key))
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("acme", "a", 1)
    assert [a.name for a in reg.list_adapters("acme")] == ["b"]
    assert _count(reg, adapter_versions) == 1
    assert _count(reg, adapter_aliases) == 0 and _count(reg, alias_history) == 0
    # Re-creating the name starts a fresh adapter.
    assert add(reg, "acme", "a").version == 1
    assert reg.get_version("acme", "b", 1) == keep


def test_delete_tenant_cascades_and_returns_keys(reg: Registry) -> None:
    reg.create_tenant("acme")
    reg.create_tenant("other")
    recs = [add(reg, "acme", "a"), add(reg, "acme", "a"), add(reg, "acme", "b")]
    add(reg, "other", "a")
    reg.set_alias("acme", "a", "prod", 2)
    keys = reg.delete_tenant("acme")
    assert keys == sorted(k for r in recs for k in (r.weights_key, r.manifest_key))
    assert len(keys) == 6
    assert _count(reg, adapters) == 1 and _count(reg, adapter_versions) == 1
    assert _count(reg, adapter_aliases) == 0
    assert reg.resolve("other", "a", 1).version == 1
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("acme", "a")


# -- validation ---------------------------------------------------------------------------

BAD_NAMES = ["../x", "A", "", "a/b", "é", "x" * 64, " a", "a\n", "a\x00", "ａ", None, 7]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_names_rejected(sqlite_reg: Registry, bad) -> None:
    reg = sqlite_reg
    reg.create_tenant("acme")
    add(reg, "acme", "a")
    seq = reg.change_seq()
    calls = [
        lambda: reg.create_tenant(bad),
        lambda: reg.get_tenant(bad),
        lambda: reg.ensure_tenant(bad),
        lambda: reg.delete_tenant(bad),
        lambda: reg.list_adapters(bad),
        lambda: add(reg, bad, "a"),
        lambda: add(reg, "acme", bad),
        lambda: reg.get_version(bad, "a", 1),
        lambda: reg.get_version("acme", bad, 1),
        lambda: reg.list_versions("acme", bad),
        lambda: reg.get_adapter(bad, "a"),
        lambda: reg.resolve(bad, "a", 1),
        lambda: reg.resolve("acme", bad, 1),
        lambda: reg.set_alias("acme", "a", bad, 1),
        lambda: reg.set_alias(bad, "a", "prod", 1),
        lambda: reg.get_aliases("acme", bad),
        lambda: reg.rollback("acme", "a", bad),
        lambda: reg.delete_adapter("acme", bad),
        lambda: reg.delete_version(bad, "a", 1),
        lambda: reg.set_version_status("acme", bad, 1, "approved"),
        lambda: reg.update_metrics(bad, "a", 1, {}),
    ]
    if isinstance(bad, str):  # None means "prod" and 7 version 7: valid refs
        calls.append(lambda: reg.resolve("acme", "a", bad))
    for call in calls:
        with pytest.raises(InvalidNameError):
            call()
    assert reg.change_seq() == seq
    assert [t.name for t in reg.list_tenants()] == ["acme"]


@pytest.mark.parametrize("bad", [0, -3, True, 1.5, "1", 2**31])
def test_invalid_versions_rejected(sqlite_reg: Registry, bad) -> None:
    reg = sqlite_reg
    reg.create_tenant("acme")
    add(reg, "acme", "a")
    for call in (
        lambda: reg.get_version("acme", "a", bad),
        lambda: reg.set_alias("acme", "a", "prod", bad),
        lambda: reg.delete_version("acme", "a", bad),
        lambda: reg.update_metrics("acme", "a", bad, {}),
    ):
        with pytest.raises(InvalidNameError):
            call()


# -- change feed and sharing --------------------------------------------------------------


def test_change_feed_grows_on_each_mutation(reg: Registry) -> None:
    assert reg.change_seq() == 0
    assert reg.changes_since(0) == []
    steps = [
        lambda: reg.create_tenant("acme"),
        lambda: add(reg, "acme", "a"),
        lambda: add(reg, "acme", "a"),
        lambda: reg.set_alias("acme", "a", "prod", 1),
        lambda: reg.set_alias("acme", "a", "prod", 2),
        lambda: reg.rollback("acme", "a"),
        lambda: reg.set_version_status("acme", "a", 2, "rejected"),
        lambda: reg.update_metrics("acme", "a", 2, {"acc": 1.0}),
        lambda: reg.delete_version("acme", "a", 2),
        lambda: reg.delete_adapter("acme", "a"),
        lambda: reg.delete_tenant("acme"),
    ]
    seqs = [reg.change_seq()]
    for step in steps:
        step()
        seqs.append(reg.change_seq())
    assert seqs == list(range(len(steps) + 1))
    # Reads and refused writes log nothing.
    reg.list_tenants()
    with pytest.raises(NotFoundError):
        reg.get_tenant("acme")
    assert reg.change_seq() == len(steps)

    feed = reg.changes_since(0)
    assert [c.kind for c in feed] == [
        "tenant_created", "version_added", "version_added", "alias_set", "alias_set",
        "alias_rollback", "version_status", "metrics_updated", "version_deleted",
        "adapter_deleted", "tenant_deleted",
    ]
    assert feed[0].adapter is None and feed[1].tenant == "acme" and feed[1].adapter == "a"
    assert all(c.at.tzinfo is not None for c in feed)
    assert [c.seq for c in reg.changes_since(8)] == [9, 10, 11]
    assert [c.seq for c in reg.changes_since(0, limit=2)] == [1, 2]
    with pytest.raises(ValueError):
        reg.changes_since(-1)


def test_two_registries_share_one_file(db_url: str) -> None:
    a = Registry(db_url)
    b = Registry(db_url)
    try:
        a.create_tenant("acme")
        add(a, "acme", "x")
        assert b.get_tenant("acme").name == "acme"
        seq = b.change_seq()
        b.set_alias("acme", "x", "prod", 1)
        assert a.change_seq() == seq + 1
        assert a.resolve("acme", "x").version == 1
        assert [c.kind for c in a.changes_since(seq)] == ["alias_set"]
        add(b, "acme", "x")
        assert a.get_adapter("acme", "x").versions == [1, 2]
    finally:
        a.close()
        b.close()


def test_sqlite_settings_and_from_engine(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'shared.db'}")
    reg = Registry.from_engine(engine)
    try:
        assert reg.engine is engine
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30000
        reg.create_tenant("acme")
        assert Registry.from_engine(engine).get_tenant("acme").name == "acme"  # idempotent setup
    finally:
        reg.close()
