"""Image datasets through the same files and jobs as text (issue 14): upload, storage, quota,
submit, one task per adapter. Real SQLite files, real stores on disk, images made with Pillow."""

from __future__ import annotations

import base64
import subprocess
import sys
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Table, func, select

from adapters import schema
from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.datasets import from_records
from adapters.errors import DatasetError
from adapters.jobs import gate, task_data
from adapters.jobs.adapter_tasks import AdapterTaskError
from adapters.jobs.files import Files
from adapters.jobs.manager import InvalidJobError, JobManager
from adapters.quotas import StorageQuotaError, TenantQuotas, storage_used
from adapters.jobs.runner import WorkerContext, run_job
from adapters.jobs.task_bases import BaseUnavailableError, TaskBases, load_task_bases
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.training import HyperparameterError
from adapters.synthetic import random_image_artifact
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION
from adapters.vision.backbone import tiny_vision_base
from adapters.vision.image_datasets import ImageDataset
from tests.training_data import FAST_HP, sentiment
from tests.image_files import distinct, image_folder, make_zip, png_header_only

IMAGE = IMAGE_CLASSIFICATION
TEXT_ROWS = [{"text": f"good {i}", "label": "pos"} for i in range(4)] + [
    {"text": f"bad {i}", "label": "neg"} for i in range(4)]
TEXT_JSONL = b"".join(json.dumps(r).encode() + b"\n" for r in TEXT_ROWS)


@dataclass
class World:
    registry: Registry
    store: LocalStore
    files: Files
    jobs: JobManager

    def rows(self, table: Table) -> int:
        with self.registry.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(table)))


@pytest.fixture()
def world(tmp_path: Path) -> World:
    reg = Registry(f"sqlite:///{tmp_path / 'tailor.db'}")
    reg.create_tenant("acme")
    store = LocalStore(tmp_path / "store")
    return World(reg, store, Files(reg.engine, store), JobManager(reg.engine, store))


def pets_zip(cats: int = 3, dogs: int = 3) -> bytes:
    return make_zip(image_folder({"cat": cats, "dog": dogs}))


def upload(world: World, data: bytes, name: str = "pets.zip", **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("task", IMAGE)
    return world.files.upload("acme", name, data, limits=TenantQuotas().dataset_limits(), **kw)


def keys(world: World) -> list[str]:
    return world.store.list("tenants/")


# -- upload -------------------------------------------------------------------------------------


def test_a_valid_image_zip_is_stored_as_one_image_file(world: World) -> None:
    members = image_folder({"cat": 3, "dog": 2})
    members["dog/copy.png"] = members["dog/000.png"]  # a repeat of the same label: dropped, counted
    data = make_zip(members)
    rec = upload(world, data)
    assert (rec.task, rec.format, rec.rows, rec.labels, rec.duplicates_dropped, rec.bytes) == \
        (IMAGE, "zip", 5, ["cat", "dog"], 1, len(data))
    assert world.files.list("acme") == [rec] and world.files.get("acme", rec.id).task == IMAGE
    assert len(keys(world)) == 1 and world.rows(schema.files) == 1
    again, ds = world.files.load("acme", rec.id)
    assert again == rec and isinstance(ds, ImageDataset)
    assert ds.labels == ("cat", "dog") and ds.duplicates_dropped == 1
    assert sorted(e.source for e in ds.examples)[0] == "member 'cat/000.png'"
    assert {e.data for e in ds.examples} == {members[f"cat/{i:03d}.png"] for i in range(3)} | \
        {members[f"dog/{i:03d}.png"] for i in range(2)}
    assert ds.image(0).size == (16, 16)  # decodes again, with the limits it was checked with


def test_jsonl_of_base64_images_and_text_keep_their_tasks(world: World) -> None:
    lines = [json.dumps({"image": base64.b64encode(distinct(i)).decode(), "label": "ab"[i % 2]}) for i in range(6)]
    rec = upload(world, "\n".join(lines).encode(), name="pets.jsonl")
    assert (rec.task, rec.format, rec.rows) == (IMAGE, "jsonl", 6)
    text = world.files.upload("acme", "reviews.jsonl", TEXT_JSONL, limits=TenantQuotas().dataset_limits())
    assert (text.task, text.format, text.rows) == (TEXT_CLASSIFICATION, "jsonl", 8)  # no task: text, as always
    assert world.files.load("acme", text.id)[1] == from_records(TEXT_ROWS)


@pytest.mark.parametrize("data,task,error", [
    (make_zip({"../cat/1.png": distinct(1), "dog/2.png": distinct(2)}), IMAGE, DatasetError),  # zip slip
    (make_zip({"cat/1.png": png_header_only(30_000, 30_000), "dog/2.png": distinct(2)}), IMAGE, DatasetError),
    (make_zip({"cat/1.png": b"not an image", "dog/2.png": distinct(2)}), IMAGE, DatasetError),
    (make_zip(image_folder({"cat": 4})), IMAGE, DatasetError),  # one label
    (TEXT_JSONL, IMAGE, DatasetError),  # text rows are not image rows
    (pets_zip(), TEXT_CLASSIFICATION, DatasetError),  # a zip is not a text dataset
    (pets_zip(), "audio-classification", task_data.InvalidTaskError),  # no such task
])
def test_every_refusal_stores_nothing(world: World, data: bytes, task: str, error: type) -> None:
    with pytest.raises(error) as caught:
        upload(world, data, task=task)
    assert caught.value.param  # names where: the file, a member, a line, the task
    assert keys(world) == [] and world.rows(schema.files) == 0 and world.files.list("acme") == []


def test_an_unknown_task_is_a_422_naming_it(world: World) -> None:
    with pytest.raises(task_data.InvalidTaskError, match="unsupported task 'audio'.*image-classification"):
        upload(world, pets_zip(), task="audio")


def test_the_storage_quota_counts_the_stored_image_dataset(world: World) -> None:
    data = pets_zip()
    world.registry.create_tenant("small", quotas={"max_storage_bytes": len(data) + len(data) // 2})
    rec = world.files.upload("small", "pets.zip", data, limits=TenantQuotas().dataset_limits(), task=IMAGE)
    with world.registry.engine.connect() as conn:
        tid = conn.scalar(select(schema.tenants.c.id).where(schema.tenants.c.name == "small"))
        assert storage_used(conn, tid) == (rec.bytes, 0) == (len(data), 0)
    before = keys(world)
    with pytest.raises(StorageQuotaError, match="max_storage_bytes"):
        world.files.upload("small", "more.zip", pets_zip(4, 4), limits=TenantQuotas().dataset_limits(), task=IMAGE)
    assert keys(world) == before and [f.id for f in world.files.list("small")] == [rec.id]


def test_a_damaged_stored_image_dataset_is_refused_by_name() -> None:
    good = task_data.dump(IMAGE, task_data.load(IMAGE, task_data.dump(IMAGE, _parsed(pets_zip()))))
    assert task_data.load(IMAGE, good).labels == ("cat", "dog")
    lines = good.split(b"\n")
    for damaged in (good[: len(good) // 2], b"\n".join(lines[:1] + lines[2:]), b"\n".join([b"{}"] + lines[1:])):
        with pytest.raises(DatasetError, match="stored image dataset is damaged"):
            task_data.load(IMAGE, damaged)


def _parsed(data: bytes) -> ImageDataset:
    from adapters.tasks import get_task

    return get_task(IMAGE).parse_dataset(data, format=None, limits=None, what="pets.zip")


# -- jobs ---------------------------------------------------------------------------------------


def test_an_image_job_from_an_image_file(world: World) -> None:
    rec, ds = world.files.load("acme", upload(world, pets_zip()).id)
    job = world.jobs.submit("acme", "pets", training=ds, training_file=rec.id)
    assert (job.task, job.status, job.method, job.training_file) == (IMAGE, "queued", "lora", rec.id)
    assert job.dataset == {"training_examples": 6, "validation_examples": None, "labels": ["cat", "dog"],
                           "duplicates_dropped": 0}
    assert world.jobs.get("acme", job.id).task == IMAGE and world.jobs.list("acme")[0].task == IMAGE
    stored = world.store.get(job.training_key, sha256=job.training_sha256)  # checksummed
    assert task_data.load(job.task, stored) == ds
    assert world.jobs.adapter_task("acme", "pets") == IMAGE and world.jobs.adapter_task("acme", "other") is None


def test_a_text_job_is_what_it_always_was(world: World) -> None:
    job = world.jobs.submit("acme", "sent", training=from_records(TEXT_ROWS))
    assert job.task == TEXT_CLASSIFICATION
    assert world.store.get(job.training_key, sha256=job.training_sha256) == task_data.dataset_to_jsonl(
        from_records(TEXT_ROWS))


def test_a_text_validation_file_with_an_image_training_file_is_refused(world: World) -> None:
    images = upload(world, pets_zip())
    texts = world.files.upload("acme", "reviews.jsonl", TEXT_JSONL, limits=TenantQuotas().dataset_limits())
    before = keys(world)
    with pytest.raises(InvalidJobError, match=f"validation file '{texts.id}' is text-classification data but "
                                              f"the training file '{images.id}' is image-classification") as e:
        world.jobs.submit("acme", "pets", training=world.files.load("acme", images.id)[1], training_file=images.id,
                          validation=world.files.load("acme", texts.id)[1], validation_file=texts.id)
    assert e.value.param == "validation_file"
    with pytest.raises(InvalidJobError, match="training data is text-classification data, but the job's task is "
                                              "image-classification"):
        world.jobs.submit("acme", "pets", training=from_records(TEXT_ROWS), task=IMAGE)
    assert keys(world) == before and world.rows(schema.jobs) == 0


def test_image_jobs_take_the_job_methods_and_quotas_of_text(world: World) -> None:
    ds = _parsed(pets_zip())
    with pytest.raises(InvalidJobError, match="method must be one of lora, head"):
        world.jobs.submit("acme", "pets", training=ds, method="full")
    assert world.jobs.submit("acme", "pets", training=ds, method="head").method == "head"
    world.registry.create_tenant("one", quotas={"max_adapters": 1})
    world.jobs.submit("one", "a", training=ds)
    with pytest.raises(Exception, match="adapter quota exceeded"):
        world.jobs.submit("one", "b", training=ds)
    assert keys(world) and world.rows(schema.jobs) == 2


def test_hyperparameters_are_the_tasks_own_and_checked_at_submit(world: World) -> None:
    ds = _parsed(pets_zip())
    for bad, key in (({"image_size": 33}, "image_size"), ({"max_length": 64}, "max_length")):
        with pytest.raises(HyperparameterError) as e:
            world.jobs.submit("acme", "pets", training=ds, hyperparameters=bad)
        assert e.value.param == f"hyperparameters.{key}"
    with pytest.raises(HyperparameterError, match="hflip"):  # text jobs keep text's
        world.jobs.submit("acme", "sent", training=from_records(TEXT_ROWS), hyperparameters={"hflip": False})
    assert keys(world) == [] and world.rows(schema.jobs) == 0
    job = world.jobs.submit("acme", "pets", training=ds, hyperparameters={"image_size": 64, "hflip": False})
    assert job.hyperparameters == {"image_size": 64, "hflip": False}


def test_an_adapter_keeps_one_task(world: World) -> None:
    ds = _parsed(pets_zip())
    text_job = world.jobs.submit("acme", "sent", training=from_records(TEXT_ROWS))
    with pytest.raises(AdapterTaskError, match=f"adapter 'sent' is of task text-classification \\(its active job "
                                               f"{text_job.id} trains text-classification\\); this job trains "
                                               "image-classification") as e:
        world.jobs.submit("acme", "sent", training=ds)
    assert e.value.param == "adapter"
    world.jobs.cancel("acme", text_job.id)  # no active job, no version: the name is free again
    assert world.jobs.submit("acme", "sent", training=ds).task == IMAGE
    # versions decide once there are any; a legacy manifest ("classification") is text
    world.registry.add_version("acme", "reviews", weights_key="w", manifest_key="m", sha256="0" * 64, nbytes=1,
                               base_fingerprint="f", manifest={"task": "classification"})
    with pytest.raises(AdapterTaskError, match="'reviews' is of task text-classification \\(its versions are "
                                               "text-classification\\)"):
        world.jobs.submit("acme", "reviews", training=ds)
    assert world.jobs.submit("acme", "reviews", training=from_records(TEXT_ROWS)).task == TEXT_CLASSIFICATION
    assert [j.adapter for j in world.jobs.list("acme")].count("reviews") == 1


# -- the worker side ----------------------------------------------------------------------------


def _worker(world: World, tmp_path: Path, loaders: dict) -> WorkerContext:  # type: ignore[type-arg]
    catalog = Catalog(world.registry, world.store)
    base = tiny_base(seed=1)
    return WorkerContext(manager=world.jobs, catalog=catalog, trainer_base=base,
                         engine=Engine(tiny_base(seed=1), catalog, EngineConfig(device_slots=65)),
                         worker_id="w1", checkpoint_root=tmp_path / "ckpts", base_loaders=loaders)


def test_each_task_base_is_loaded_once_and_only_for_its_jobs(world: World, tmp_path: Path) -> None:
    loads: list[str] = []

    def load_images() -> TaskBases:
        loads.append("image")
        if len(loads) == 1:
            raise OSError("weights file missing")
        return load_task_bases(tiny_vision_base(), Catalog(world.registry, world.store))

    ctx = _worker(world, tmp_path, {IMAGE: load_images})
    assert ctx.bases(TEXT_CLASSIFICATION).engine is ctx.engine and ctx.bases("classification").engine is ctx.engine
    assert loads == []  # text jobs never load the vision base
    with pytest.raises(BaseUnavailableError, match="could not load its image-classification base: OSError: weights"):
        ctx.bases(IMAGE)
    images = ctx.bases(IMAGE)  # tried again on the next job
    assert ctx.bases(IMAGE) is images and loads == ["image", "image"]
    assert images.engine.base.spec.task == IMAGE and images.engine.base is not images.trainer_base
    with pytest.raises(BaseUnavailableError, match="no image-classification base"):
        _worker(world, tmp_path, {}).bases(IMAGE)


def test_the_gate_scores_image_candidates_on_the_image_engine(world: World) -> None:
    bases = load_task_bases(tiny_vision_base(), Catalog(world.registry, world.store))
    art = random_image_artifact(bases.engine.base.spec, n_labels=2)
    version = bases.engine.catalog.publish("acme", "pets", art, spec=bases.engine.base.spec).version
    adapter = bases.engine.acquire(bases.engine.resolve("acme", f"pets@{version}"))
    inputs, limits = task_data.raw_inputs(_parsed(pets_zip(3, 3)))
    labels = ["label_0"] * 3 + ["label_1"] * 3
    preds = [p.label for p in bases.engine.classify(bases.engine.decode_rows(inputs), [adapter] * 6)]
    scored = gate.score(bases.engine, adapter, inputs, labels, limits=limits)
    assert scored["n"] == 6 and scored["accuracy"] == sum(p == t for p, t in zip(preds, labels)) / 6
    # the published image version makes "pets" an image adapter: a text job for it is refused
    with pytest.raises(AdapterTaskError, match="'pets' is of task image-classification"):
        world.jobs.submit("acme", "pets", training=from_records(TEXT_ROWS))


def test_an_image_job_runs_end_to_end_in_process(world: World, tmp_path: Path) -> None:
    """Upload a zip, submit, claim and run the job on the tiny vision base: a version of task
    image-classification is published, gated on the image engine and served by it."""
    from tests.test_image_training import FAST, squares

    train = squares(48, seed=0)
    data = make_zip({f"{e.label}/{i:03d}.png": e.data for i, e in enumerate(train.examples)})
    rec, ds = world.files.load("acme", upload(world, data).id)
    loads: list[TaskBases] = []

    def load_images() -> TaskBases:
        loads.append(load_task_bases(tiny_vision_base(seed=1), Catalog(world.registry, world.store)))
        return loads[-1]

    ctx = _worker(world, tmp_path, {IMAGE: load_images})
    submitted = world.jobs.submit("acme", "pets", training=ds, training_file=rec.id,
                                  hyperparameters={**FAST, "epochs": 3, "patience": 3})
    job = world.jobs.claim("w1")
    assert job is not None and job.id == submitted.id
    assert run_job(job, ctx) == "succeeded" and len(loads) == 1
    done = world.jobs.get("acme", job.id)
    assert done.version == 1 and done.result["promoted"] and done.resolved_hyperparameters["image_size"] == 32
    assert done.result["gate"]["candidate"]["n"] == done.dataset["validation_examples"] == 10
    [version] = world.registry.list_versions("acme", "pets")
    assert version.manifest["task"] == IMAGE and version.manifest["job_id"] == job.id
    engine = loads[0].engine  # the gate's engine serves it: the trained colours are told apart
    test = squares(16, seed=5)
    adapter = engine.acquire(engine.resolve("acme", "pets"))
    preds = engine.classify(engine.decode_rows([e.data for e in test.examples]), [adapter] * 16)
    assert sum(p.label == e.label for p, e in zip(preds, test.examples)) >= 14
    assert world.jobs.adapter_task("acme", "pets") == IMAGE


def test_a_job_whose_adapter_became_another_tasks_meanwhile_publishes_nothing(world: World, tmp_path: Path) -> None:
    ctx = _worker(world, tmp_path, {})
    world.jobs.submit("acme", "clf", training=from_records(sentiment(48)), hyperparameters=FAST_HP)
    job = world.jobs.claim("w1")
    assert job is not None
    vision = tiny_vision_base().spec  # an image version arrives while the text job trains
    ctx.catalog.publish("acme", "clf", random_image_artifact(vision, n_labels=2), spec=vision)
    assert run_job(job, ctx) == "failed"
    failed = world.jobs.get("acme", job.id)
    assert failed.error is not None and failed.error.code == "adapter_task_mismatch"
    assert "'clf' is of task image-classification" in failed.error.message
    assert [v.version for v in world.registry.list_versions("acme", "clf")] == [1]


def test_a_worker_process_that_trains_only_images(tmp_path: Path) -> None:
    """``python -m adapters.jobs.worker --tasks image-classification``: its first base is the
    image one (no text base is loaded), and it runs an image job to its end with the image
    trainer."""
    from tests.test_image_training import FAST, squares

    url = f"sqlite:///{tmp_path / 'tailor.db'}"
    Registry(url).create_tenant("acme")
    jm = JobManager(Registry(url).engine, LocalStore(tmp_path / "store"))
    job = jm.submit("acme", "pets", training=squares(48, seed=0), hyperparameters={**FAST, "epochs": 3},
                    promote="always")
    done = subprocess.run(
        [sys.executable, "-m", "adapters.jobs.worker", "--database-url", url, "--store-url", str(tmp_path / "store"),
         "--checkpoints", str(tmp_path / "ckpt"), "--tasks", "image-classification", "--image-base-model", "tiny:1",
         "--once", "--threads", "1", "--nice", "0"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = jm.get("acme", job.id)
    # trained on the image base with image settings: tiny:1's calibrated statistics let it learn
    assert got.status == "succeeded" and got.error is None, got.error
    assert got.resolved_hyperparameters is not None
    assert got.resolved_hyperparameters["image_size"] == 32 and "hflip" in got.resolved_hyperparameters
    assert got.metrics["val_accuracy"] >= 0.8, got.metrics
    assert "trains image-classification" in done.stderr and "MiniLM" not in done.stderr
