"""The head's learning-rate multiplier (``head_lr_scale``; its auto value ``HEAD_LR_SCALE``) reaches
the optimizer: in a tiny LoRA run on a random BERT, the head's parameters, and only they, sit in
an AdamW parameter group whose rate is the multiplier times the LoRA parameters' rate."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.base import tiny_base
from adapters.training import Hyperparameters, TrainCallbacks
from adapters.training import hyperparams
from adapters.training.loop import _Loop
from adapters.training.text_task import TextTask
from tests.training_data import FAST_HP, sentiment

LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_base(seed=1, initializer_range=0.3)


def trained_loop(base: Any, hp: dict[str, Any]) -> _Loop:
    """The loop of a finished LoRA run with ``hp`` (its optimizer as the last step left it)."""
    tr, va = sentiment(64, seed=0), sentiment(24, seed=1)
    ids = {name: i for i, name in enumerate(LABELS)}
    x, y = [r["text"] for r in tr], [ids[r["label"]] for r in tr]
    vx, vy = [r["text"] for r in va], [ids[r["label"]] for r in va]
    rhp = Hyperparameters.from_dict({**FAST_HP, "epochs": 4, "patience": 4, **hp}).resolve(len(x), "lora")
    run = _Loop(TextTask(base, LABELS, "lora", rhp, x, y, vx, vy), rhp, TrainCallbacks())
    run.fit(None)
    return run


def rates(run: _Loop, head_name: str) -> tuple[set[float], set[float]]:
    """The optimizer rates of the head's parameters and of the LoRA parameters, checking that every
    trainable parameter is one of the two and sits in exactly one group."""
    trainable = {id(p): n for n, p in run.model.named_parameters() if p.requires_grad}
    placed = [id(p) for g in run.opt.param_groups for p in g["params"]]
    assert sorted(placed) == sorted(trainable)  # each trainable parameter once, nothing else
    head, lora = set(), set()
    for g in run.opt.param_groups:
        for p in g["params"]:
            parts = trainable[id(p)].split(".")
            assert head_name in parts or any(k in parts for k in ("lora_A", "lora_B")), trainable[id(p)]
            (head if head_name in parts else lora).add(g["lr"])
    assert head and lora and 0 not in head | lora
    return head, lora


@pytest.mark.parametrize("how", ["hyperparameter", "auto constant", "auto constant, small set"])
def test_the_head_rate_multiplier_reaches_the_heads_optimizer_group_only(base: Any, how: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "hyperparameter":
        run = trained_loop(base, {"head_lr_scale": 4})
    else:  # "auto" resolves to HEAD_LR_SCALE, or HEAD_LR_SCALE_SMALL on at most SMALL_SET examples
        small = how.endswith("small set")
        monkeypatch.setattr(hyperparams, "HEAD_LR_SCALE_SMALL" if small else "HEAD_LR_SCALE", 4.0)
        monkeypatch.setattr(hyperparams, "SMALL_SET", 10_000 if small else 0)
        run = trained_loop(base, {"head_lr_scale": "auto"})  # FAST_HP sets 1
        assert run.hp.head_lr_scale == 4.0
    head, lora = rates(run, base.head_name)
    assert len(head) == 1 and len(lora) == 1  # one rate for the head, one for every LoRA matrix
    assert head.pop() == pytest.approx(4 * lora.pop(), rel=1e-12)


def test_without_a_multiplier_the_head_trains_at_the_lora_rate(base: Any) -> None:
    head, lora = rates(trained_loop(base, {"head_lr_scale": 1}), base.head_name)
    assert head == lora and len(head) == 1
