"""The image auto hyper-parameters at the ends of the 20 to 20,000-image range, as a job resolves
them (after the runner's validation hold-out, ``task_data.validation_fraction``): the values
``bench.image_autohp`` measured, pinned. No model: ``resolve`` needs only the input size and the
LoRA targets."""

from __future__ import annotations

import pytest

from adapters.training.image_hyperparams import PATIENCE_STEPS, TARGET_STEPS, ImageHyperparameters
from bench.image_autohp_plan import split_counts

TARGETS = ("_blocks.5._project_conv",)


def plan(n_images: int, method: str = "lora") -> tuple[int, int, int, int]:
    """(epochs, batch size, planned optimizer steps, patience) for an upload of ``n_images``."""
    n_fit, _ = split_counts(n_images)
    r = ImageHyperparameters().resolve(n_fit, method, 224, TARGETS)
    return r.epochs, r.batch_size, r.epochs * -(-n_fit // r.batch_size), r.patience


def test_twenty_images_train_a_few_dozen_steps_not_hundreds():
    assert split_counts(20) == (10, 10)  # one training and one validation image per class
    assert plan(20) == (30, 8, 60, 30)  # patience is every epoch: 60 steps are cheap, 10 validation images noisy
    assert plan(20, "head") == (30, 8, 60, 30)


def test_twenty_thousand_images_plan_one_pass():
    """18,000 training images at batch 32 are 563 steps: one epoch already passes the ~400-step
    target, so a second (1,126 steps, twice the hours) is not planned."""
    assert plan(20_000) == (1, 32, 563, 1) and 563 >= TARGET_STEPS
    assert plan(20_000, "full")[:3] == (1, 32, 563)
    assert plan(20_000, "head")[0] == 5  # its steps are a linear layer's on features computed once


@pytest.mark.parametrize("n_images,epochs,steps", [(50, 30, 150), (200, 30, 300), (2_000, 7, 399), (10_000, 2, 564)])
def test_between_the_ends_the_plan_grows_with_the_data_and_stays_near_the_target(n_images, epochs, steps):
    e, _, s, _ = plan(n_images)
    assert (e, s) == (epochs, steps) and s <= 1.5 * TARGET_STEPS
    assert n_images < 2_000 or s >= TARGET_STEPS - 1  # no fewer steps for more data once a run is step-bound


@pytest.mark.parametrize("n_images,patience", [(50, 20), (200, 10), (2_000, 2), (10_000, 2)])
def test_patience_waits_at_least_a_hundred_steps(n_images, patience):
    """A quarter of 30 epochs (7) was 70 steps at 200 images: runs stopped at epoch 9-10 on noise."""
    epochs, batch, steps, got = plan(n_images)
    assert got == patience and (got == epochs or got * steps // epochs >= PATIENCE_STEPS)


def test_explicit_epochs_still_win():
    assert ImageHyperparameters(epochs=3).resolve(18_000, "lora", 224, TARGETS).epochs == 3
    assert ImageHyperparameters(patience=4).resolve(160, "lora", 224, TARGETS).patience == 4
