"""The import path and alias changes in the library (``adapters.adapter_import``,
``adapters.adapter_admin``), without HTTP.

Each import check refuses before anything is stored, in order (name, quotas, upload, zip, base,
labels under the tenant's limits, finite logits); the promote default is "prod if it has none";
the importing process serves a new prod at once through its listener. Every footprint quota
holds on the import path, and on a trained version's publish for a new adapter name.
Real SQLite and real files; a tiny random base.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.adapter_admin import delete_adapter, rollback, set_alias
from adapters.adapter_import import ImportedVersion, check_manifest_base, import_adapter
from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.change_listener import NO_LISTENER, ProcessCaches
from adapters.datasets import from_records
from adapters.errors import (
    AdapterNotFoundError, ArtifactError, FingerprintMismatchError, InvalidNameError, NotFoundError,
)
from adapters.jobs.manager import JobManager
from adapters.peft_format import TAILOR_FILE, export_peft, zip_files
from adapters.quotas import AdapterQuotaError, StorageQuotaError, VersionQuotaError
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from tests.test_tenancy import ROWS, Told


class World:
    def __init__(self, root: Path) -> None:
        self.registry = Registry(f"sqlite:///{root / 'tailor.db'}")
        self.store = LocalStore(root / "store")
        self.catalog = Catalog(self.registry, self.store)
        # the resolver never polls in a test: only a listener makes this process see a change
        self.engine = Engine(tiny_base(seed=1), self.catalog, EngineConfig(
            max_resident=4, device_slots=4, max_batch_size=2, resolve_poll_seconds=1e9))
        self.spec = self.engine.base.spec

    def zip(self, seed: int, **kwargs) -> bytes:
        return zip_files(export_peft(random_artifact(self.spec, seed=seed, **kwargs), self.spec))

    def load(self, name: str, data: bytes, tenant: str = "acme", **kwargs) -> ImportedVersion:
        return import_adapter(self.catalog, self.engine, tenant, name, data, **kwargs)

    def nothing_stored(self, tenant: str = "acme") -> bool:
        return self.registry.list_adapters(tenant) == [] and self.store.list(f"tenants/{tenant}/") == []


@pytest.fixture()
def world(tmp_path: Path):
    w = World(tmp_path)
    w.registry.create_tenant("acme")
    yield w
    w.registry.close()


def test_the_first_import_becomes_prod_later_ones_only_when_asked(world: World) -> None:
    first = world.load("a", world.zip(1), labels=["neg", "pos"])
    assert first.promoted and first.record.version == 1 and first.aliases == {"prod": 1}
    assert first.record.manifest["labels"] == ["neg", "pos"] and first.record.manifest["source"] == "peft"
    second = world.load("a", world.zip(2))
    assert not second.promoted and second.aliases == {"prod": 1}
    third = world.load("a", world.zip(3), promote=True)
    assert third.promoted and third.aliases == {"prod": 3}
    held = world.load("b", world.zip(4), promote=False)
    assert not held.promoted and held.aliases == {}


def test_the_importing_process_serves_a_new_prod_at_once(world: World) -> None:
    world.load("a", world.zip(1))
    assert world.engine.resolve("acme", "a").key.version == 1
    world.load("a", world.zip(2), promote=True, listener=NO_LISTENER)
    assert world.engine.resolve("acme", "a").key.version == 1  # remembered until a poll or a listener
    world.load("a", world.zip(3), promote=True, listener=ProcessCaches(engine=world.engine))
    assert world.engine.resolve("acme", "a").key.version == 3


def other_base_zip(seed: int) -> bytes:
    spec = tiny_base(seed=2, hidden_size=48).spec
    return zip_files(export_peft(random_artifact(spec, seed=seed), spec))


@pytest.mark.parametrize("case", ["name", "tenant", "empty", "not a zip", "base", "labels", "tenant labels",
                                  "non-finite"])
def test_each_check_refuses_before_anything_is_stored(world: World, case: str) -> None:
    world.registry.create_tenant("tiny", quotas={"max_labels": 2})
    tenant, name, labels, error, param = "acme", "a", None, ArtifactError, "file"
    data = world.zip(1)
    if case == "name":
        name, error, param = "Not A Name", InvalidNameError, "adapter"
    elif case == "tenant":
        tenant, error, param = "ghost", NotFoundError, "tenant"
    elif case == "empty":
        data = b""
    elif case == "not a zip":
        data, param = b"PK not really", None
    elif case == "base":
        data, error = other_base_zip(1), FingerprintMismatchError
    elif case == "labels":
        labels, param = ["ok", "bell\x07"], "labels"
    elif case == "tenant labels":  # three labels pass the format's bound but not this tenant's
        tenant, data, param = "tiny", world.zip(1, n_labels=3), "labels"
    elif case == "non-finite":
        data = world.zip(1, alpha=1e308)
    with pytest.raises(error) as e:
        world.load(name, data, tenant=tenant, labels=labels)
    assert e.value.param == param, e.value.message
    assert world.nothing_stored("acme") and world.nothing_stored("tiny")


def test_messages_of_the_upload_checks(world: World) -> None:
    with pytest.raises(ArtifactError, match="^the uploaded file is empty$"):
        world.load("a", b"")
    with pytest.raises(FingerprintMismatchError, match="base model mismatch") as e:
        world.load("a", other_base_zip(1))
    assert e.value.code == "base_mismatch"
    with pytest.raises(ArtifactError, match="non-finite"):
        world.load("a", world.zip(1, alpha=1e308))


def test_check_manifest_base() -> None:
    spec = tiny_base(seed=1).spec
    files = export_peft(random_artifact(spec, seed=1), spec)
    check_manifest_base(files, spec.fingerprint)
    check_manifest_base({k: v for k, v in files.items() if k != TAILOR_FILE}, "any other base")
    with pytest.raises(FingerprintMismatchError):
        check_manifest_base(files, "sha256:" + "0" * 64)
    with pytest.raises(ArtifactError, match=f"^{TAILOR_FILE}: ") as e:
        check_manifest_base({**files, TAILOR_FILE: b"{not json"}, spec.fingerprint)
    assert not isinstance(e.value, FingerprintMismatchError)


# -- quotas on the import path, and on a trained version's publish ----------------------------------

def test_an_import_is_held_to_every_footprint_quota(world: World) -> None:
    world.registry.create_tenant("q", quotas={"max_adapters": 2, "max_versions_per_adapter": 1})
    world.load("a", world.zip(1), tenant="q")
    JobManager(world.registry.engine, world.store).submit("q", "x", training=from_records(ROWS))  # reserves
    before = sorted(world.store.list("tenants/q/"))
    with pytest.raises(AdapterQuotaError, match="max_adapters"):
        world.load("b", b"not even a zip", tenant="q")  # refused before the upload is read
    with pytest.raises(VersionQuotaError, match="max_versions_per_adapter"):
        world.load("a", world.zip(2), tenant="q")
    assert [a.name for a in world.registry.list_adapters("q")] == ["a"]
    assert sorted(world.store.list("tenants/q/")) == before

    size = len(random_artifact(world.spec, seed=1).encode()[0])
    world.registry.create_tenant("s", quotas={"max_storage_bytes": size + size // 2})
    world.load("a", world.zip(1), tenant="s")
    with pytest.raises(StorageQuotaError, match="max_storage_bytes"):  # not full: refused by its size
        world.load("b", world.zip(2), tenant="s")
    assert [a.name for a in world.registry.list_adapters("s")] == ["a"] and len(world.store.list("tenants/s/")) == 2


def test_a_trained_version_for_a_new_adapter_is_held_to_max_adapters(world: World) -> None:
    world.registry.create_tenant("q", quotas={"max_adapters": 1})
    world.catalog.publish("q", "a", random_artifact(world.spec, seed=1))
    before = world.store.list("tenants/q/")
    with pytest.raises(AdapterQuotaError):
        world.catalog.publish("q", "b", random_artifact(world.spec, seed=2), spec=world.spec)
    assert world.store.list("tenants/q/") == before and [a.name for a in world.registry.list_adapters("q")] == ["a"]


# -- aliases and deletion ------------------------------------------------------------------------------

def test_alias_moves_tell_the_listener_after_the_change(world: World) -> None:
    for seed in (1, 2, 3):
        world.load("a", world.zip(seed))
    told = Told()
    move = set_alias(world.registry, "acme", "a", "prod", 3, listener=told)
    assert (move.version, move.previous, move.aliases) == (3, 1, {"prod": 3})
    move = set_alias(world.registry, "acme", "a", "staging", 2, listener=told)
    assert (move.previous, move.aliases) == (None, {"prod": 3, "staging": 2})
    back = rollback(world.registry, "acme", "a", listener=told)
    assert (back.alias, back.version, back.previous, back.aliases["prod"]) == ("prod", 1, 3, 1)
    assert told.events == [("changed", "acme", "a")] * 3
    with pytest.raises(AdapterNotFoundError):
        set_alias(world.registry, "acme", "nope", "prod", 1, listener=told)
    assert len(told.events) == 3


def test_deleting_an_adapter_removes_its_bytes_and_tells_the_listener(world: World) -> None:
    world.load("a", world.zip(1))
    world.load("a", world.zip(2))
    world.load("b", world.zip(3))
    world.engine.acquire(world.engine.resolve("acme", "a"))
    assert delete_adapter(world.catalog, "acme", "a", listener=ProcessCaches(engine=world.engine)) == 4
    assert world.engine.resident("acme", "a") is None
    with pytest.raises(AdapterNotFoundError):
        world.engine.resolve("acme", "a")
    assert [a.name for a in world.registry.list_adapters("acme")] == ["b"]
    assert all("/adapters/b/" in k for k in world.store.list("tenants/acme/"))


def test_an_adapter_keeps_one_task_on_every_path(world: World) -> None:
    """The import refuses an adapter of another task (naming where its task was read), and the
    registry refuses such a version in its own transaction whatever the caller."""
    from adapters.errors import AdapterTaskError
    from adapters.synthetic import random_image_artifact
    from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION
    from adapters.vision.backbone import tiny_vision_base

    world.load("a", world.zip(1))
    vision = tiny_vision_base(seed=2)
    image_engine = Engine(vision, world.catalog, EngineConfig(max_resident=4, device_slots=4, max_batch_size=2))
    photos = zip_files(export_peft(random_image_artifact(vision.spec, seed=3), vision.spec))
    with pytest.raises(AdapterTaskError, match=f"adapter 'a' is of task {TEXT_CLASSIFICATION} "
                                               rf"\(its versions are {TEXT_CLASSIFICATION}\).*{IMAGE_CLASSIFICATION}"):
        import_adapter(world.catalog, image_engine, "acme", "a", photos)
    assert [v.version for v in world.registry.list_versions("acme", "a")] == [1]
    # a publisher that skips the import's check meets the registry's
    art = random_image_artifact(vision.spec, seed=4)
    with pytest.raises(AdapterTaskError, match="this version is of task image-classification"):
        world.catalog.publish("acme", "a", art, spec=vision.spec)
    assert [v.version for v in world.registry.list_versions("acme", "a")] == [1]
    # an active text job holds a new name for text
    JobManager(world.registry.engine, world.store).submit(
        "acme", "b", training=from_records(ROWS), task=TEXT_CLASSIFICATION)
    with pytest.raises(AdapterTaskError, match="its active job"):
        import_adapter(world.catalog, image_engine, "acme", "b", photos)
    assert import_adapter(world.catalog, image_engine, "acme", "c", photos).record.version == 1


def test_import_task_reads_the_upload_then_the_adapter(world: World) -> None:
    from adapters.adapter_import import import_task
    from adapters.errors import InvalidTaskError
    from adapters.synthetic import random_image_artifact
    from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION
    from adapters.vision.backbone import tiny_vision_base

    heads = {TEXT_CLASSIFICATION: "classifier", IMAGE_CLASSIFICATION: "_fc"}
    vision = tiny_vision_base(seed=2)
    photos = zip_files(export_peft(random_image_artifact(vision.spec, seed=3), vision.spec))
    plain = {k: v for k, v in export_peft(random_image_artifact(vision.spec, seed=3), vision.spec).items()
             if k != TAILOR_FILE}  # a plain peft adapter: only modules_to_save tells
    text = world.zip(1)

    def task(data: bytes, given: str | None = None, name: str = "x") -> str:
        return import_task(world.catalog, "acme", name, data, given=given, heads=heads, default=TEXT_CLASSIFICATION)

    assert task(photos) == IMAGE_CLASSIFICATION  # the Tailor manifest says so
    assert task(zip_files(plain)) == IMAGE_CLASSIFICATION  # _fc in modules_to_save
    assert task(text) == TEXT_CLASSIFICATION
    assert task(b"not a zip") == TEXT_CLASSIFICATION  # the import then says what is wrong
    assert task(photos, given=" text-classification ") == TEXT_CLASSIFICATION  # the field wins
    with pytest.raises(InvalidTaskError, match="task: .*audio"):
        task(photos, given="audio")
    world.load("held", text)
    assert task(zip_files(plain), name="held") == TEXT_CLASSIFICATION  # the adapter's own task, before heads
