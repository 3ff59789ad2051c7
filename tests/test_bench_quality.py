"""bench.quality's pieces that need no model: the TF-IDF baseline, seed means, data set cleaning."""

from __future__ import annotations

import pytest

from bench import data
from bench.quality import summarise
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
