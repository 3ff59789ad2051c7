"""``head_init``: a lora or full run's new head started from a closed-form probe (LP-FT)."""

from __future__ import annotations

import pytest
import torch

from adapters.base import tiny_base
from adapters.pooling import Pooling
from adapters.training import Hyperparameters, TrainCallbacks, TrainingYielded, train
from adapters.training.hyperparams import HEAD_INIT, HyperparameterError
from adapters.training.linear_probe import C_GRID, fit_probe
from adapters.training.text_task import TextTask
from tests.training_data import FAST_HP, sentiment

LABELS = ("neg", "pos")
CPU = torch.device("cpu")
# no dropout anywhere: the probe's head meets the features it was fitted on
QUIET = {**FAST_HP, "epochs": 4, "lora_dropout": 0.0, "head_init": "probe"}


def _data() -> tuple[list[str], list[int], list[str], list[int]]:
    tr, va = sentiment(60, seed=0), sentiment(20, seed=1)
    ids = {n: i for i, n in enumerate(LABELS)}
    return ([r["text"] for r in tr], [ids[r["label"]] for r in tr], [r["text"] for r in va],
            [ids[r["label"]] for r in va])


def _quiet_base():
    return tiny_base(seed=1, initializer_range=0.3, pooling=Pooling.parse("mean"), dropout=0.0)


def _train(base, hp: dict, method: str = "lora", **kw):
    events: list[tuple[str, str]] = []
    cb = kw.pop("callbacks", None) or TrainCallbacks()
    cb = TrainCallbacks(on_event=lambda level, m: events.append((level, m)), should_yield=cb.should_yield)
    xt, yt, xv, yv = _data()
    res = train(base, xt, yt, LABELS, xv, yv, method=method, hp=Hyperparameters.from_dict(hp), callbacks=cb,
                threads=1, **kw)
    return res, events


# -- the setting ------------------------------------------------------------------------------------

def test_auto_head_init_follows_the_method_and_explicit_values_win():
    for method in ("lora", "full"):
        assert Hyperparameters().resolve(100, method, CPU).head_init == HEAD_INIT[method]
        for value in ("random", "probe"):
            assert Hyperparameters.from_dict({"head_init": value}).resolve(100, method, CPU).head_init == value
    assert Hyperparameters().resolve(100, "head", CPU).head_init == "random"


def test_a_wrong_head_init_names_the_field():
    with pytest.raises(HyperparameterError) as e:
        Hyperparameters.from_dict({"head_init": "zeros"})
    assert e.value.param == "hyperparameters.head_init" and "probe" in e.value.message
    with pytest.raises(HyperparameterError) as e:
        Hyperparameters.from_dict({"head_init": "probe"}).resolve(100, "head", CPU)
    assert e.value.param == "hyperparameters.head_init" and "solver" in e.value.message


def test_only_a_probe_start_changes_the_checkpoint_fingerprint():
    base = _quiet_base()
    xt, yt, xv, yv = _data()

    def fp(extra: dict) -> str:
        hp = Hyperparameters.from_dict({**FAST_HP, **extra}).resolve(len(xt), "lora", CPU)
        return TextTask(base, LABELS, "lora", hp, xt, yt, xv, yv).fingerprint()

    assert fp({}) == fp({"head_init": "random"})  # runs from before the setting keep their checkpoints
    assert fp({"head_init": "probe"}) != fp({})


# -- the start ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_head_starts_as_the_probe_of_the_untrained_features(method):
    base = _quiet_base()
    xt, yt, xv, yv = _data()
    hp = Hyperparameters.from_dict(QUIET).resolve(len(xt), method, CPU)
    torch.manual_seed(0)
    task = TextTask(base, LABELS, method, hp, xt, yt, xv, yv)
    task.build()
    task.encode(lambda: None)
    untrained = task._features(task._train, lambda: None)
    info = task.warm_start(lambda: None)
    assert info is not None and info.get("level", "info") == "info" and info["probe_c"] in C_GRID
    probe = fit_probe(untrained, yt, len(LABELS), seed=hp.seed)
    assert info["probe_c"] == probe.c
    task.set_training(False)
    with torch.no_grad():
        logits = task.forward(task.val_batch(torch.arange(len(yv))))
    features = task._features(task._val, lambda: None)
    torch.testing.assert_close(logits, features @ probe.weight.T + probe.bias, rtol=1e-4, atol=1e-4)


def test_a_probe_start_is_reported_and_deterministic_and_training_goes_on_from_it():
    base = _quiet_base()
    res, events = _train(base, QUIET)
    started = [m for level, m in events if m.startswith("head started from a probe")]
    assert len(started) == 1 and "cross-validation" in started[0] and "before training: val accuracy" in started[0]
    assert res.hyperparameters["head_init"] == "probe" and res.metrics["steps"] > 0
    again, _ = _train(base, QUIET)
    assert torch.equal(again.artifact.weights.head_weight, res.artifact.weights.head_weight)
    plain, _ = _train(base, {**QUIET, "head_init": "random"})
    assert not torch.equal(plain.artifact.weights.head_weight, res.artifact.weights.head_weight)


def test_a_run_resumed_from_a_checkpoint_skips_the_start_and_ends_as_an_uninterrupted_run(tmp_path):
    base = _quiet_base()
    straight, _ = _train(base, QUIET)
    asked = {"n": 0}

    def yield_once(at_epoch_end: bool) -> bool:  # mid-epoch 2, once
        asked["n"] += 1
        return not at_epoch_end and asked["n"] == 7

    with pytest.raises(TrainingYielded):
        _train(base, QUIET, checkpoint_dir=tmp_path, callbacks=TrainCallbacks(should_yield=yield_once))
    resumed, events = _train(base, QUIET, checkpoint_dir=tmp_path)
    assert any(m.startswith("resumed from the checkpoint") for _, m in events)
    assert not any(m.startswith("head started") for _, m in events)
    assert torch.equal(resumed.artifact.weights.head_weight, straight.artifact.weights.head_weight)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]


def test_a_probe_that_dropout_upsets_keeps_the_random_head_and_says_so():
    # BERT's pooler over a random tiny model: its features barely vary, and dropout moves them
    # further than that, so the probe's head would start far worse than guessing
    base = tiny_base(seed=1, initializer_range=0.3)
    hp = {**FAST_HP, "epochs": 4}
    kept, events = _train(base, {**hp, "head_init": "probe"})
    warned = [m for level, m in events if level == "warning" and "kept the random head" in m]
    assert len(warned) == 1 and "guessing the label frequencies" in warned[0]
    plain, _ = _train(base, hp)
    # the check drew no random numbers of the run's own: it trains exactly as a random start does
    assert [h["train_loss"] for h in kept.history] == [h["train_loss"] for h in plain.history]
    assert torch.equal(kept.artifact.weights.head_weight, plain.artifact.weights.head_weight)
