"""Progress of a run that stops before its planned steps ends at 100%.

Early stopping used to leave the last progress report at, say, step 60 of 90 (the job then
showed "step 60/90, eta 16.8s" and the CLI's bar ended at 67%). The trainer now reports one
last step with the plan shrunk to the steps it ran; a run that trains every planned step
reports nothing extra.
"""

from __future__ import annotations

import pytest

from adapters.base import tiny_base
from adapters.training import Hyperparameters, TrainCallbacks, train
from tests.training_data import FAST_HP, sentiment

LABELS = ("neg", "pos")
Step = tuple[int, int, int, float]


@pytest.fixture(scope="module")
def base():
    return tiny_base(seed=1, initializer_range=0.3)


def run(base, hp: dict) -> tuple[list[Step], list[dict]]:
    tr, va = sentiment(80, seed=0), sentiment(30, seed=1)
    ids = {name: i for i, name in enumerate(LABELS)}
    steps: list[Step] = []
    result = train(base, [r["text"] for r in tr], [ids[r["label"]] for r in tr], LABELS,
                   [r["text"] for r in va], [ids[r["label"]] for r in va], method="lora",
                   hp=Hyperparameters.from_dict(hp), threads=1,
                   callbacks=TrainCallbacks(on_step=lambda s, t, e, loss: steps.append((s, t, e, loss))))
    return steps, result.history


def test_early_stop_ends_progress_at_the_steps_run(base):
    steps, history = run(base, {**FAST_HP, "epochs": 12, "patience": 1})  # 5 steps an epoch, 60 planned
    assert len(history) < 12, "this run was meant to stop early"
    ran = 5 * len(history)
    assert all(total == 60 for _, total, _, _ in steps[:-1])
    last_step, last_total, last_epoch, last_loss = steps[-1]
    assert (last_step, last_total, last_epoch) == (ran, ran, len(history))
    assert last_loss == pytest.approx(history[-1]["train_loss"])


def test_a_full_run_reports_its_plan_unchanged(base):
    steps, history = run(base, {**FAST_HP, "epochs": 2})
    assert len(history) == 2 and [s for s, *_ in steps] == [10] and steps[-1][1] == 10
