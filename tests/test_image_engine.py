"""Image tenants through the Engine and the MicroBatcher (issue 14 items 2 and 4).

An image engine over the tiny vision base serves a mixed batch of three image adapters
(different ranks, targets and label counts) and base rows, each row equal to that adapter
alone through peft (Conv2d LoRA, fp32) within 1e-5; raw image bytes are decoded by the task;
a text engine and an image engine in one process do not interfere; an adapter of the other
task is refused naming both tasks.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import threading

import pytest
import torch

from adapters.artifact import AdapterArtifact, AdapterWeights
from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.errors import InvalidInputError, TaskMismatchError
from adapters.registry import Registry
from adapters.runtime.batcher import MicroBatcher
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.loaded import LoadedAdapter
from adapters.store import LocalStore
from adapters.synthetic import random_artifact, random_image_artifact
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, manifest_value
from adapters.vision.backbone import tiny_vision_base
from adapters.vision.images import ImageLimits, ImageTooLargeError, decode_image, preprocess
from tests.image_files import distinct, png_header_only
from tests.test_vision_lora import ROWS, images, max_diff, peft_adapter

TEXTS = ["good morning", "a dreadful film", "taxes and budgets", "the cup final"]


def as_artifact(loaded: LoadedAdapter) -> AdapterArtifact:
    """The peft reference adapter as an image artifact (what training or an import stores)."""
    manifest = dataclasses.replace(loaded.manifest, task=manifest_value(IMAGE_CLASSIFICATION))
    return AdapterArtifact(manifest, AdapterWeights(lora=dict(loaded.lora), head_weight=loaded.head_weight,
                                                    head_bias=loaded.head_bias))


@pytest.fixture()
def world(tmp_path):
    """A vision engine with three tenants' peft-made adapters published, and a text engine on
    the same registry and store."""
    vision = tiny_vision_base(seed=1)
    pristine = copy.deepcopy(vision.model)  # the same frozen backbone, never wrapped
    paths = list(vision.lora_paths)
    project = [p for p in paths if p.endswith("_project_conv")]
    expand_and_head = [p for p in paths if p.endswith("_expand_conv")] + ["_conv_head"]
    refs = {
        "a": peft_adapter(vision, pristine, "a", r=4, alpha=8, targets=paths, n_labels=3, seed=1),
        "b": peft_adapter(vision, pristine, "b", r=8, alpha=4, targets=project, n_labels=5, seed=2),
        "c": peft_adapter(vision, pristine, "c", r=2, alpha=2, targets=expand_and_head, n_labels=2, seed=3),
    }
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    for name, (_, loaded) in refs.items():
        catalog.registry.create_tenant(f"t{name}")
        catalog.publish(f"t{name}", "photos", as_artifact(loaded), promote=True, spec=vision.spec)
    config = EngineConfig(max_resident=16, device_slots=9, max_batch_size=8)
    engine = Engine(vision, catalog, config)
    text_engine = Engine(tiny_base(seed=3), catalog, config)
    catalog.registry.create_tenant("words")
    catalog.publish("words", "sentiment", random_artifact(text_engine.base.spec, seed=4, n_labels=3),
                    promote=True, spec=text_engine.base.spec)
    served = {name: engine.acquire(engine.resolve(f"t{name}", "photos")) for name in refs}
    return engine, text_engine, pristine, {n: ref for n, (ref, _) in refs.items()}, served


def test_a_mixed_batch_of_image_tenants_equals_each_adapter_alone_through_peft(world):
    engine, _, pristine, refs, served = world
    assert engine.task.name == IMAGE_CLASSIFICATION and engine.task.input_field == "images"
    x = images(len(ROWS), engine.base.input_size, seed=11)
    rows = [None if n is None else served[n] for n in ROWS]
    out = engine.forward(engine.serving.collate(list(x)), rows)
    preds = engine.predict_rows(list(x), rows)
    with torch.inference_mode():
        base_features = pristine(x)
        want = {n: ref(x) for n, ref in refs.items()}
    for i, name in enumerate(ROWS):
        if name is None:
            assert preds[i] is None and out.logits[i] is None
            assert max_diff(out.features[i], base_features[i]) <= 1e-6  # base rows are the backbone
            continue
        got = out.logits[i]
        assert got.shape == (served[name].n_labels,)
        assert max_diff(got, want[name][i]) <= 1e-5, (name, i)
        assert max_diff(want[name][i], refs[name].base_model.model._fc(base_features[i])) > 1e-2  # LoRA matters
        probs = torch.softmax(want[name][i], -1)
        assert preds[i].label == served[name].labels[int(probs.argmax())]
        assert abs(preds[i].score - float(probs.max())) <= 1e-5


def test_the_batcher_merges_image_tenants_and_each_gets_its_own_rows(world):
    engine, _, _, refs, served = world
    x = images(6, engine.base.input_size, seed=12)
    with torch.inference_mode():
        want = {n: torch.softmax(ref(x), -1) for n, ref in refs.items()}
    with MicroBatcher(engine, max_batch_size=8, max_wait_ms=60_000) as batcher:
        futures = {n: batcher.submit([(served[n], row) for row in x[:2]]) for n in ("a", "b")}
        futures["c"] = batcher.submit([(served["c"], row) for row in x[:4]])  # 8 rows: one merged pass
        results = {n: f.result(timeout=60) for n, f in futures.items()}
        assert batcher.batches == 1 and batcher.recent[-1].adapters == 3
    for name, preds in results.items():
        for i, p in enumerate(preds):
            assert abs(p.score - float(want[name][i].max())) <= 1e-5
            assert p.label == served[name].labels[int(want[name][i].argmax())]


def test_raw_images_are_decoded_by_the_task_and_bad_ones_named(world):
    engine, *_ = world
    raw = [distinct(1, size=(40, 24)), distinct(2, fmt="JPEG"), base64.b64encode(distinct(3)).decode()]
    rows = engine.decode_rows(raw)
    size = engine.base.input_size
    assert all(r.shape == (3, size, size) and r.dtype == torch.float32 for r in rows)
    assert torch.equal(rows[0], preprocess(decode_image(raw[0]), size))
    assert torch.equal(rows[2], preprocess(decode_image(distinct(3)), size))
    with pytest.raises(InvalidInputError) as e:
        engine.decode_rows([distinct(1), b"not an image"])
    assert e.value.param == "images[1]" and e.value.message.startswith("images[1] ")
    with pytest.raises(InvalidInputError, match="images\\[0\\] is not valid base64"):
        engine.decode_rows(["@@@"])
    with pytest.raises(ImageTooLargeError, match="images\\[0\\].*the limit is 1,000 pixels"):
        engine.decode_rows([png_header_only(100, 100)], limits=ImageLimits(max_pixels=1000))
    # a decoded row that could not run is refused before it joins a shared batch
    with MicroBatcher(engine, max_batch_size=4, max_wait_ms=1) as batcher:
        a = engine.acquire(engine.resolve("ta", "photos"))
        with pytest.raises(InvalidInputError, match="images\\[1\\]"):
            batcher.submit([(a, rows[0]), (a, torch.zeros(3, size + 1, size))])
        with pytest.raises(TypeError):
            batcher.submit([(a, "a text")])
        assert batcher.queued_rows == 0
        assert batcher.submit([(a, rows[1])]).result(timeout=30)[0].label in a.labels


def test_adapters_of_the_other_task_are_refused_naming_both(world):
    engine, text_engine, *_ = world
    with pytest.raises(TaskMismatchError, match="text-classification adapter.*serves image-classification"):
        engine.acquire(engine.resolve("words", "sentiment"))
    with pytest.raises(TaskMismatchError, match="image-classification adapter.*serves text-classification"):
        text_engine.acquire(text_engine.resolve("ta", "photos"))
    image_adapter = engine.acquire(engine.resolve("ta", "photos"))
    text_adapter = text_engine.acquire(text_engine.resolve("words", "sentiment"))
    with MicroBatcher(text_engine, max_batch_size=4, max_wait_ms=1) as batcher:
        with pytest.raises(TaskMismatchError):
            batcher.submit([(image_adapter, "a text")])
    with pytest.raises(TaskMismatchError):
        text_engine.catalog.publish("words", "wrong", random_image_artifact(engine.base.spec),
                                    spec=text_engine.base.spec)
    assert text_adapter.manifest.task == "classification"  # text adapters record the legacy value


def test_a_text_engine_and_an_image_engine_in_one_process_do_not_interfere(world):
    engine, text_engine, _, refs, served = world
    words = text_engine.acquire(text_engine.resolve("words", "sentiment"))
    x = images(4, engine.base.input_size, seed=13)
    # references, each engine alone
    text_want = text_engine.classify(TEXTS, [words] * len(TEXTS))
    image_want = engine.predict_rows(list(x), [served["a"], served["b"], None, served["c"]])
    results: dict[str, list] = {"text": [], "image": []}

    def hammer(kind: str) -> None:
        for _ in range(5):
            if kind == "text":
                results[kind].append(text_batcher.submit([(words, t) for t in TEXTS]).result(timeout=60))
            else:
                rows = [(served["a"], x[0]), (served["b"], x[1]), (served["c"], x[3])]
                results[kind].append(image_batcher.submit(rows).result(timeout=60))

    with MicroBatcher(text_engine, max_batch_size=8, max_wait_ms=1) as text_batcher, \
            MicroBatcher(engine, max_batch_size=8, max_wait_ms=1) as image_batcher:
        threads = [threading.Thread(target=hammer, args=(k,)) for k in ("text", "image", "text", "image")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(results["text"]) == len(results["image"]) == 10
    for preds in results["text"]:
        for p, q in zip(preds, text_want, strict=True):
            assert p.label == q.label and abs(p.score - q.score) <= 1e-5
    for preds in results["image"]:
        for p, q in zip(preds, [image_want[0], image_want[1], image_want[3]], strict=True):
            assert p.label == q.label and abs(p.score - q.score) <= 1e-5
    assert text_engine.classify(TEXTS, [words] * len(TEXTS))[1].scores == text_want[1].scores
