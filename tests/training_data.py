"""A small separable sentiment set for training tests on tiny random models."""

from __future__ import annotations

import random

POS = ["good", "great", "nice", "lovely", "superb", "fine"]
NEG = ["bad", "awful", "poor", "terrible", "nasty", "grim"]


def sentiment(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(POS if label == "pos" else NEG)
        rows.append({"text": f"{word} {word} the day {rng.choice(['one', 'two', 'three'])} {i}", "label": label})
    return rows


# what a tiny random model needs to learn the set above in a few seconds
# "search": False -- the hyper-parameter search (on by default for small sets) is tested in test_search.py
# "head_lr_scale": 1 -- at this rate (10x auto) the head trains at it too; auto would give small sets 10x
# (hyperparams.HEAD_LR_SCALE_SMALL), tested in test_training_lr_groups.py
FAST_HP = {"epochs": 12, "learning_rate": 0.01, "batch_size": 16, "patience": 12, "seed": 0, "search": False,
           "head_lr_scale": 1}

# a job that keeps its worker busy until it is cancelled, on sentiment(200): 100 epochs at a rate
# the tiny base trains steadily at. FAST_HP's 0.01, or any rate on a set of a few dozen rows (6
# validation rows), ends such a run in seconds: a validation set predicted as one label after a
# healthy epoch stops training early (adapters.training.divergence), and when that happens
# depends on the CPU's floating-point kernels. Measured on an AVX-512 CPU: 30 epochs of this ran
# through to 1.0 validation accuracy, where 0.01 stopped at epoch 5.
SLOW_HP = {**FAST_HP, "epochs": 100, "patience": 100, "batch_size": 4, "learning_rate": 0.003}
