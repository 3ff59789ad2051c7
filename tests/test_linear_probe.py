"""The head method's closed-form solver: ``adapters.training.linear_probe`` and how training uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters.base import tiny_base
from adapters.training import Hyperparameters, TrainCallbacks, TrainingCancelled, train
from adapters.training.hyperparams import HyperparameterError
from adapters.training.linear_probe import C_GRID, fit_probe
from tests.training_data import FAST_HP, sentiment

LABELS = ("neg", "pos")


def blobs(n: int, d: int = 6, seed: int = 0, scale: float = 1.0, offset: float = 5.0, noise: float = 1.0):
    """Three labels, each a Gaussian blob in ``d`` dimensions, features shifted and scaled like raw ones."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, d, generator=g) * 2
    y = torch.arange(n) % 3
    x = centres[y] + noise * torch.randn(n, d, generator=g)
    return x * scale + offset, y.tolist()


def test_the_probe_separates_blobs_and_acts_on_raw_features():
    x_all, y_all = blobs(600, seed=3)  # one draw (the centres follow the seed): 400 to fit, 200 held out
    fx, fy, hx, hy = x_all[:400], y_all[:400], x_all[400:], y_all[400:]
    probe = fit_probe(fx, fy, 3, seed=0)
    acc = float(((hx @ probe.weight.T + probe.bias).argmax(1) == torch.tensor(hy)).float().mean())
    assert acc >= 0.9
    assert probe.c in C_GRID and set(probe.cv_accuracy) == set(C_GRID)
    assert probe.fits == 3 * 5 * len(C_GRID) + 1
    # the weights read the raw (shifted, scaled) features: the standardisation is folded in
    manual = F.cross_entropy(fx @ probe.weight.T + probe.bias, torch.tensor(fy)).item()
    assert abs(manual - probe.train_loss) < 1e-3


def test_the_penalty_is_chosen_by_cross_validation_not_fixed():
    # noise dimensions only: the strongest penalty generalises best; a clean signal wants less
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(60, 200, generator=g)
    noisy = fit_probe(noise, [i % 2 for i in range(60)], 2, seed=0)
    x, y = blobs(600, d=4, seed=3)
    clean = fit_probe(x, y, 3, seed=0)
    assert noisy.c < clean.c or noisy.c == min(C_GRID)
    assert max(clean.cv_accuracy.values()) > 0.9 and max(noisy.cv_accuracy.values()) < 0.8


def test_the_probe_is_deterministic_for_a_seed_and_the_folds_follow_it():
    x, y = blobs(200, d=30, seed=5, noise=4.0)  # overlapping: held-out accuracy depends on the folds
    a, b = fit_probe(x, y, 3, seed=4), fit_probe(x, y, 3, seed=4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.cv_accuracy == b.cv_accuracy
    others = {tuple(fit_probe(x, y, 3, seed=s).cv_accuracy.values()) for s in range(3)}
    assert len(others) > 1  # the folds are dealt from the seed


def test_a_label_with_fewer_rows_than_folds_and_a_constant_feature_still_fit():
    x, y = blobs(40, d=5, seed=2)
    x[:, 2] = 7.0  # constant: its standard deviation is 0
    y = [0] * 37 + [1, 2, 2]
    probe = fit_probe(x, y, 3, seed=0)
    assert torch.isfinite(probe.weight).all() and torch.isfinite(probe.bias).all()


def test_a_nearly_constant_feature_gets_no_outsized_weight():
    # MiniLM's last layer has dimensions like this: dividing by their deviation gave weights of 10^6
    x, y = blobs(200, d=6, seed=3)
    x[:, 4] = 1e-9 * torch.tensor(y, dtype=x.dtype)  # it even separates the labels, at rounding size
    probe = fit_probe(x, y, 3, seed=0)
    assert probe.weight[:, 4].abs().max() < 10 * probe.weight[:, :4].abs().max()
    moved = x.clone()
    moved[:, 4] += 1e-4  # a rounding-sized change of that feature leaves the logits as they were
    torch.testing.assert_close(moved @ probe.weight.T + probe.bias, x @ probe.weight.T + probe.bias,
                               rtol=1e-4, atol=1e-3)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        fit_probe(torch.zeros(3, 4), [0, 1], 2)


def test_the_probe_polls_between_fits():
    x, y = blobs(100)
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 3:
            raise TrainingCancelled("cancelled")

    with pytest.raises(TrainingCancelled):
        fit_probe(x, y, 3, poll=poll)


# -- the solver setting ---------------------------------------------------------------------------

def test_auto_solver_is_lbfgs_for_the_head_method_unless_steps_are_asked_for():
    cpu = torch.device("cpu")
    assert Hyperparameters().resolve(100, "head", cpu).solver == "lbfgs"
    assert Hyperparameters().resolve(100, "lora", cpu).solver == "adamw"
    for field, value in (("epochs", 3), ("learning_rate", 1e-2), ("batch_size", 8), ("patience", 2),
                         ("warmup_ratio", 0.1)):
        assert Hyperparameters.from_dict({field: value}).resolve(100, "head", cpu).solver == "adamw", field
    assert Hyperparameters.from_dict({"epochs": 3, "solver": "lbfgs"}).resolve(100, "head", cpu).solver == "lbfgs"
    assert Hyperparameters.from_dict({"solver": "adamw"}).resolve(100, "head", cpu).solver == "adamw"


def test_a_wrong_solver_names_the_field():
    with pytest.raises(HyperparameterError) as e:
        Hyperparameters.from_dict({"solver": "sgd"})
    assert e.value.param == "hyperparameters.solver" and "lbfgs" in e.value.message
    with pytest.raises(HyperparameterError) as e:
        Hyperparameters.from_dict({"solver": "lbfgs"}).resolve(100, "lora", torch.device("cpu"))
    assert e.value.param == "hyperparameters.solver" and "head" in e.value.message


def _train_head(hp: dict, events: list, epochs: list, steps: list):
    tr, va = sentiment(60, seed=0), sentiment(20, seed=1)
    ids = {n: i for i, n in enumerate(LABELS)}
    cb = TrainCallbacks(on_event=lambda level, m: events.append(m), on_epoch=lambda e, m: epochs.append(m),
                        on_step=lambda *a: steps.append(a))
    base = tiny_base(seed=1, initializer_range=0.3)
    return train(base, [r["text"] for r in tr], [ids[r["label"]] for r in tr], LABELS,
                 [r["text"] for r in va], [ids[r["label"]] for r in va], method="head",
                 hp=Hyperparameters.from_dict(hp), callbacks=cb, threads=1)


def test_a_head_job_with_every_default_is_fitted_in_closed_form_and_reports_it():
    events, epochs, steps = [], [], []
    hp = {k: v for k, v in FAST_HP.items() if k not in ("epochs", "batch_size", "learning_rate", "patience")}
    res = _train_head(hp, events, epochs, steps)
    assert res.hyperparameters["solver"] == "lbfgs"
    assert res.metrics["steps"] == 0 and res.metrics["epochs_run"] == 1 and res.best_epoch == 1
    assert len(epochs) == 1 and epochs[0]["probe_c"] in C_GRID and epochs[0]["probe_fits"] == 3 * 5 * len(C_GRID) + 1
    assert steps == [(1, 1, 1, pytest.approx(epochs[0]["train_loss"]))]  # progress reaches 100%
    told = next(m for m in events if m.startswith("head fitted by L-BFGS"))
    assert f"C={epochs[0]['probe_c']:g}" in told and "cross-validation" in told
    assert res.artifact is not None and res.artifact.manifest.source == "tailor-head"
    again = _train_head(hp, [], [], [])
    assert torch.equal(again.artifact.weights.head_weight, res.artifact.weights.head_weight)
