"""The trainer on a tiny random BERT: learns, is deterministic, resumes, cancels, diverges cleanly."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from peft import PeftModel
from torch import nn

from adapters.base import tiny_base
from adapters.peft_format import export_peft
from adapters.training import (
    HyperparameterError, Hyperparameters, TrainCallbacks, TrainingCancelled, TrainingDiverged, train,
)
from adapters.training.metrics import classification_metrics
from tests.training_data import FAST_HP, sentiment

LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def base():
    return tiny_base(seed=1, initializer_range=0.3)


def split(n_train=80, n_val=30):
    tr, va = sentiment(n_train, seed=0), sentiment(n_val, seed=1)
    ids = {name: i for i, name in enumerate(LABELS)}
    return ([r["text"] for r in tr], [ids[r["label"]] for r in tr],
            [r["text"] for r in va], [ids[r["label"]] for r in va])


def run(base, method="lora", hp=None, **kw):
    x, y, vx, vy = split()
    return train(base, x, y, LABELS, vx, vy, method=method, hp=Hyperparameters.from_dict(hp or FAST_HP), **kw)


def test_lora_learns_and_its_artifact_is_what_peft_runs(base, tmp_path):
    before = {n: p.clone() for n, p in base.model.named_parameters()}
    head_type = type(getattr(base.model, base.head_name))
    res = run(base)
    assert res.metrics["val_accuracy"] >= 0.9
    assert 0 < res.trainable_params < 0.2 * res.total_params
    art = res.artifact
    assert art.manifest.labels == LABELS and art.manifest.base_fingerprint == base.spec.fingerprint
    assert art.manifest.metrics["val_accuracy"] == res.metrics["val_accuracy"]
    # the artifact, loaded by peft into a fresh copy of the base, gives the reported accuracy
    model = copy.deepcopy(base.model)
    setattr(model, base.head_name, nn.Linear(base.spec.head_in_features, 2))
    for fname, data in export_peft(art, base.spec).items():
        (tmp_path / fname).write_bytes(data)
    ref = PeftModel.from_pretrained(model, str(tmp_path)).eval()
    _, _, vx, vy = split()
    with torch.inference_mode():
        preds = ref(**base.tokenize(vx)).logits.argmax(-1).tolist()
    assert classification_metrics(vy, preds, 2)["accuracy"] == pytest.approx(res.metrics["val_accuracy"])
    # the shared base was not touched
    assert type(getattr(base.model, base.head_name)) is head_type
    assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())
    assert not any(p.requires_grad for p in base.model.parameters())


def test_head_method_trains_only_the_head(base):
    res = run(base, "head", {**FAST_HP, "learning_rate": 0.05, "epochs": 20})
    assert res.metrics["val_accuracy"] >= 0.7  # random frozen features: well above chance (0.5)
    assert res.trainable_params == base.spec.head_in_features * 2 + 2
    (path, (a, b)), = res.artifact.weights.lora.items()
    assert a.shape[0] == 1 and not b.any()  # an exact no-op LoRA pair: only the head matters


def test_same_seed_same_weights_other_seed_differs(base):
    a, b = run(base, hp={**FAST_HP, "epochs": 3}), run(base, hp={**FAST_HP, "epochs": 3})
    c = run(base, hp={**FAST_HP, "epochs": 3, "seed": 5})
    wa, wb, wc = (r.artifact.weights.lora for r in (a, b, c))
    assert all(torch.equal(wa[p][1], wb[p][1]) for p in wa)
    assert any(not torch.equal(wa[p][1], wc[p][1]) for p in wa)


def test_resume_from_checkpoint_ends_with_the_same_weights(base, tmp_path):
    hp = {**FAST_HP, "epochs": 4}
    straight = run(base, hp=hp)
    ckpt = tmp_path / "ckpt"
    # interrupt after epoch 2 (as a kill would), then run again on the same checkpoint folder
    stop_after = {"epoch": 0}

    def on_epoch(epoch, _):
        stop_after["epoch"] = epoch

    with pytest.raises(TrainingCancelled):
        run(base, hp=hp, checkpoint_dir=ckpt,
            callbacks=TrainCallbacks(on_epoch=on_epoch, should_stop=lambda: stop_after["epoch"] >= 2))
    events = []
    resumed = run(base, hp=hp, checkpoint_dir=ckpt, callbacks=TrainCallbacks(on_event=lambda l, m: events.append(m)))
    assert any("resumed from the checkpoint after epoch 2" in m for m in events)
    ws, wr = straight.artifact.weights, resumed.artifact.weights
    for p in ws.lora:
        assert torch.allclose(ws.lora[p][0], wr.lora[p][0], atol=1e-6)
        assert torch.allclose(ws.lora[p][1], wr.lora[p][1], atol=1e-6)
    assert torch.allclose(ws.head_weight, wr.head_weight, atol=1e-6)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]


def test_callbacks_report_progress_and_cancel_stops_quickly(base):
    steps, epochs = [], []
    run(base, hp={**FAST_HP, "epochs": 3, "batch_size": 4},
        callbacks=TrainCallbacks(on_step=lambda s, t, e, l: steps.append((s, t)), on_epoch=lambda e, m: epochs.append(m)))
    assert steps and [s for s, _ in steps] == sorted(s for s, _ in steps) and steps[-1][0] == steps[-1][1]
    assert [m["epoch"] for m in epochs] == [1, 2, 3] and all("val_accuracy" in m for m in epochs)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    t0 = time.perf_counter()
    with pytest.raises(TrainingCancelled):
        run(base, hp={**FAST_HP, "epochs": 50}, callbacks=TrainCallbacks(should_stop=stop))
    assert time.perf_counter() - t0 < 10


def test_absurd_learning_rate_diverges_with_a_clear_reason(base):
    with pytest.raises(TrainingDiverged, match="learning_rate"):
        run(base, hp={**FAST_HP, "learning_rate": 1.0, "epochs": 4, "warmup_ratio": 0.0})


@pytest.mark.parametrize("bad,param", [
    ({"epochs": 0}, "epochs"), ({"learning_rate": -1}, "learning_rate"), ({"batch_size": 2.5}, "batch_size"),
    ({"lora_r": "big"}, "lora_r"), ({"epochz": 3}, "epochz"), ({"target_modules": []}, "target_modules"),
    ({"seed": True}, "seed"),
])
def test_invalid_hyperparameters_name_the_field(bad, param):
    with pytest.raises(HyperparameterError) as e:
        Hyperparameters.from_dict(bad)
    assert e.value.param == f"hyperparameters.{param}"


def test_auto_resolves_for_small_and_large_sets():
    small, large = Hyperparameters().resolve(50, "lora"), Hyperparameters().resolve(50_000, "lora")
    assert small.epochs == 10 and large.epochs == 2 and large.batch_size == 32
    assert small.lora_r == 8 and small.target_modules == ("query", "value") and small.learning_rate == 1e-3
    assert Hyperparameters().resolve(100, "full").learning_rate == 5e-5
