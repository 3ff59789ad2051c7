"""Image training on a tiny random vision base: learns, serves what it trained, is deterministic,
resumes exactly, and its settings, layer-wise rates and inputs are what they claim.

Images are made here with Pillow: a red or a blue square on a grey background of random size
and place (colour is what a tiny random CNN separates): ``tiny_vision_base`` as it is (its batch-norm
statistics calibrated on noise) learns them.
"""

from __future__ import annotations

import copy
import io
import json
import random
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from adapters.errors import DatasetError
from adapters.runtime.context import use_plan
from adapters.runtime.head import MixedHead
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.lora_conv import wrap_convs
from adapters.runtime.slots import SlotBank
from adapters.tasks import IMAGE_CLASSIFICATION
from adapters.training import HyperparameterError, TrainCallbacks, TrainingCancelled, TrainingYielded
from adapters.training.image_hyperparams import ImageHyperparameters
from adapters.training.image_inputs import TrainImages, centre_crops, normalise
from adapters.training.image_task import auto_targets, resolve_image_hyperparameters, train_images
from adapters.training.layer_decay import block_stages, decayed_groups
from adapters.vision.augment import Augmentation
from adapters.vision.backbone import tiny_vision_base
from adapters.vision.image_datasets import ImageDataset, ImageExample
from adapters.vision.images import preprocess

LABELS = ("blue", "red")
FAST = {"epochs": 6, "learning_rate": 0.01, "batch_size": 8, "patience": 6, "seed": 0}


def squares(n: int, seed: int) -> ImageDataset:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        label = LABELS[i % 2]
        strong, weak = 200 + rng.randint(0, 55), rng.randint(0, 60)
        colour = (strong, weak, rng.randint(0, 60)) if label == "red" else (weak, rng.randint(0, 60), strong)
        w, h = rng.randint(40, 64), rng.randint(40, 64)
        image = Image.new("RGB", (w, h), (rng.randint(100, 160),) * 3)
        side, centre = rng.randint(18, 30), min(w, h)  # inside the central square validation sees
        x, y = (w - centre) // 2 + rng.randint(0, centre - side), (h - centre) // 2 + rng.randint(0, centre - side)
        ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=colour)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        examples.append(ImageExample(buf.getvalue(), label, f"line {i + 1}"))
    return ImageDataset(tuple(examples), LABELS)


TRAIN, VAL = squares(48, seed=0), squares(24, seed=1)


@pytest.fixture(scope="module")
def base():
    return tiny_vision_base(seed=1)


@pytest.fixture(scope="module")
def lora_run(base):
    return run(base)


def run(base, method="lora", hp=None, **kw):
    kw.setdefault("threads", 1)
    return train_images(base, TRAIN, VAL, method=method, hp=ImageHyperparameters.from_dict(hp or FAST), **kw)


def val_pixels(base) -> torch.Tensor:
    return torch.stack([preprocess(VAL.image(i), base.input_size) for i in range(len(VAL))])


def served_logits(artifacts: list, rows: list[int | None]) -> torch.Tensor:
    """A fresh copy of the base prepared as the engine prepares it (pointwise convs wrapped, mixed
    head, device slots); row ``i`` runs ``artifacts[rows[i]]`` (None: the base)."""
    base = tiny_vision_base(seed=1)
    wrap_convs(base.model, list(base.lora_paths))
    base.model._fc = MixedHead(base.feature_dim)
    bank = SlotBank(base.spec.linear_shapes, base.feature_dim, 4, base.device, base.dtype)
    loaded = [LoadedAdapter.from_artifact(VersionKey("t", f"a{i}", 1, f"a{i}"), art, base.dtype)
              for i, art in enumerate(artifacts)]
    x = val_pixels(base)[: len(rows)]
    plan = bank.plan([None if r is None else loaded[r] for r in rows])
    with torch.inference_mode(), use_plan(plan):
        return base.model(x)


def same_weights(a, b, atol=0.0) -> bool:
    wa, wb = a.artifact.weights, b.artifact.weights
    pairs = [(wa.head_weight, wb.head_weight), (wa.head_bias, wb.head_bias)]
    pairs += [(wa.lora[p][k], wb.lora[p][k]) for p in wa.lora for k in (0, 1)]
    return wa.lora.keys() == wb.lora.keys() and all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in pairs)


# -- it learns, and serving gives the training-time logits -----------------------------------------


def test_lora_learns_and_its_artifact_serves_the_training_logits(base, lora_run):
    pristine = {n: p.clone() for n, p in base.model.named_parameters()}
    res = lora_run
    assert res.metrics["val_accuracy"] >= 0.9  # chance: 0.5
    assert 0 < res.trainable_params < 0.5 * res.total_params
    art = res.artifact
    m = art.manifest
    assert m.task == IMAGE_CLASSIFICATION and m.labels == LABELS and m.base_fingerprint == base.fingerprint
    assert m.head_in_features == base.feature_dim and m.lora.r == 4 and m.lora.alpha == 8
    assert sorted(art.weights.lora) == sorted(auto_targets(base))
    for path, (a, b) in art.weights.lora.items():
        c_in, c_out = base.spec.linear_shapes[path]
        assert a.shape == (4, c_in) and b.shape == (c_out, 4)
    assert any(b.abs().max() > 0 for _, b in art.weights.lora.values())  # LoRA trained, not just the head
    assert all(torch.equal(p, pristine[n]) for n, p in base.model.named_parameters())  # the base is untouched
    # the trained model and the served artifact agree, also mixed with base rows in one batch
    with torch.inference_mode():
        want = res.model(val_pixels(base))
    preds = want.argmax(-1).tolist()
    assert sum(p == y for p, y in zip(preds, [LABELS.index(e.label) for e in VAL.examples])) / len(VAL) == \
        pytest.approx(res.metrics["val_accuracy"])
    rows = [0, None, 0, 0, None, 0]
    got = served_logits([art], rows)
    for i, r in enumerate(rows):
        if r is not None:
            assert (got[i, :2] - want[i]).abs().max().item() <= 1e-5


def test_head_method_trains_only_the_head_on_frozen_features(base, lora_run):
    res = run(base, "head", {**FAST, "epochs": 15, "learning_rate": 0.05})
    assert res.metrics["val_accuracy"] >= 0.8
    assert res.trainable_params == base.feature_dim * 2 + 2
    (path, (a, b)), = res.artifact.weights.lora.items()
    assert path == base.lora_paths[-1] and a.shape[0] == 1 and not b.any()  # a no-op pair on the cheapest conv
    assert res.artifact.manifest.source == "tailor-head"
    with torch.inference_mode():
        head_want, lora_want = res.model(val_pixels(base)), lora_run.model(val_pixels(base))
    rows = [1, 0, None, 1, 0]  # the head adapter and the LoRA adapter side by side
    got = served_logits([lora_run.artifact, res.artifact], rows)
    for i, r in enumerate(rows):
        if r is not None:
            want = (lora_want if r == 0 else head_want)[i]
            assert (got[i, :2] - want).abs().max().item() <= 1e-5


def test_full_method_is_a_benchmark_anchor_without_an_artifact(base):
    res = run(base, "full", {**FAST, "epochs": 2, "learning_rate": 3e-3})
    assert res.artifact is None and res.trainable_params == res.total_params


# -- determinism, resume, yield --------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_differs(base, lora_run):
    again = run(base)
    assert same_weights(lora_run, again) and again.history == lora_run.history
    other = run(base, hp={**FAST, "seed": 5})
    assert not same_weights(lora_run, other)


def test_resume_after_a_cancel_and_a_mid_epoch_yield_ends_with_the_same_weights(base, lora_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    seen = {"epoch": 0}

    def on_epoch(epoch, _):
        seen["epoch"] = epoch

    with pytest.raises(TrainingCancelled):  # interrupted after epoch 2, as a kill would
        run(base, checkpoint_dir=ckpt,
            callbacks=TrainCallbacks(on_epoch=on_epoch, should_stop=lambda: seen["epoch"] >= 2))
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 2
    asks = {"n": 0}

    def yield_once(at_epoch_end: bool) -> bool:  # the 4th step of this turn (mid-epoch 3) gives way
        asks["n"] += 1
        return not at_epoch_end and asks["n"] == 3

    with pytest.raises(TrainingYielded) as y:
        run(base, checkpoint_dir=ckpt, callbacks=TrainCallbacks(should_yield=yield_once))
    assert y.value.mid_epoch and y.value.epoch == 3
    events = []
    resumed = run(base, checkpoint_dir=ckpt, callbacks=TrainCallbacks(on_event=lambda lv, msg: events.append(msg)))
    assert any("resumed from the checkpoint after epoch 2 and 3 steps of epoch 3" in e for e in events)
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in lora_run.history]
    assert same_weights(resumed, lora_run, atol=1e-6)
    other = run(base, hp={**FAST, "epochs": 3}, checkpoint_dir=ckpt)  # other settings: from scratch
    assert [h["epoch"] for h in other.history] == [1, 2, 3]


# -- inputs, augmentation, layer-wise rates --------------------------------------------------------


def test_validation_is_what_serving_sees_and_training_crops_are_seeded_per_epoch_and_example():
    no_poll = lambda: None  # noqa: E731
    crops = normalise(centre_crops(VAL, 32, no_poll))
    assert torch.equal(crops, torch.stack([preprocess(VAL.image(i), 32) for i in range(len(VAL))]))
    aug = Augmentation(size=32)
    kept, decoded = TrainImages(TRAIN, 32, no_poll), TrainImages(TRAIN, 32, no_poll, budget=0)
    assert all(kept.kept) and not any(decoded.kept)  # past the budget: decoded on use, same pixels
    first = kept.batch([3, 7, 11], 1, aug, seed=0)
    assert first.shape == (3, 3, 32, 32)
    assert torch.equal(first, decoded.batch([3, 7, 11], 1, aug, seed=0))
    assert torch.equal(first[1], kept.batch([7], 1, aug, seed=0)[0])  # not a function of the batch
    assert not torch.equal(first, kept.batch([3, 7, 11], 2, aug, seed=0))  # another epoch, other crops
    assert not torch.equal(first, kept.batch([3, 7, 11], 1, aug, seed=1))


def test_layer_decay_gives_lower_stages_smaller_rates(base):
    model = copy.deepcopy(base.model)
    model._fc = nn.Linear(base.feature_dim, 2)
    named = list(model.named_parameters())
    stages = block_stages(model)
    assert stages == [0, 1, 1, 2]  # the tiny base: blocks 1 and 2 are one stage
    groups = decayed_groups(named, stages, 0.5)
    scale = {n: g.lr_scale for g in groups for n, _ in g.params}
    assert sorted(scale) == sorted(n for n, _ in named)  # every parameter exactly once
    assert scale["_fc.weight"] == 1.0 and scale["_conv_head.weight"] == 0.5
    assert scale["_blocks.3._project_conv.weight"] == 0.25
    assert scale["_blocks.1._expand_conv.weight"] == scale["_blocks.2._project_conv.weight"] == 0.125
    assert scale["_blocks.0._project_conv.weight"] == 0.0625 and scale["_conv_stem.weight"] == 0.03125
    assert [g.lr_scale for g in decayed_groups(named, stages, 1.0)] == [1.0]
    with pytest.raises(ValueError, match="no layer"):
        decayed_groups([("classifier.weight", named[0][1])], stages, 0.5)


# -- settings --------------------------------------------------------------------------------------


def test_auto_hyperparameters_scale_from_20_to_20000_images(base):
    small = resolve_image_hyperparameters(ImageHyperparameters(), 20, "lora", base)
    large = resolve_image_hyperparameters(ImageHyperparameters(), 20_000, "lora", base)
    assert (small.epochs, small.batch_size, small.patience) == (30, 8, 30)  # 90 steps: never stops early
    assert (large.epochs, large.batch_size, large.patience) == (1, 32, 1)  # 625 steps: one pass is enough
    for n in (20, 200, 2_000, 20_000):  # a sane number of optimizer steps at every size
        r = resolve_image_hyperparameters(ImageHyperparameters(), n, "lora", base)
        assert 80 <= r.epochs * -(-n // r.batch_size) <= 1500
    assert small.image_size == base.input_size and small.hflip and small.layer_decay == 0.8
    assert small.target_modules == auto_targets(base)
    assert resolve_image_hyperparameters(ImageHyperparameters(), 100, "head", base).learning_rate == 5e-3
    hp = ImageHyperparameters.from_dict({"hflip": False, "image_size": 64.0, "target_modules": ["_project_conv"]})
    assert hp.hflip is False and hp.image_size == 64 and isinstance(hp.image_size, int)
    assert ImageHyperparameters.from_dict(hp.to_dict()) == hp


@pytest.mark.parametrize("bad,param", [
    ({"image_size": 100}, "image_size"), ({"image_size": True}, "image_size"), ({"hflip": "yes"}, "hflip"),
    ({"layer_decay": 0}, "layer_decay"), ({"layer_decay": float("nan")}, "layer_decay"),
    ({"max_length": 64}, "max_length"), ({"epochs": 0}, "epochs"), ({"lora_r": "big"}, "lora_r"),
])
def test_invalid_image_hyperparameters_name_the_field(bad, param):
    with pytest.raises(HyperparameterError) as e:
        ImageHyperparameters.from_dict(bad)
    assert e.value.param == f"hyperparameters.{param}" and param in e.value.message


def test_bad_data_targets_and_bases_are_refused_before_training(base):
    green = ImageDataset((replace(VAL.examples[0], label="green"),), ("green",))
    with pytest.raises(DatasetError, match="label 'green'"):
        train_images(base, TRAIN, green)
    with pytest.raises(DatasetError, match="validation set is empty"):
        train_images(base, TRAIN, ImageDataset((), LABELS))
    with pytest.raises(HyperparameterError, match="matches no pointwise"):
        train_images(base, TRAIN, VAL, hp=ImageHyperparameters(target_modules=("query",)))
    with pytest.raises(HyperparameterError, match="method"):
        train_images(base, TRAIN, VAL, method="qlora")
    served = tiny_vision_base(seed=1)
    served.model._fc = MixedHead(served.feature_dim)
    with pytest.raises(ValueError, match="prepared for serving"):
        train_images(served, TRAIN, VAL, hp=ImageHyperparameters.from_dict(FAST))
