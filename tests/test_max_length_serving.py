"""An adapter is served from texts cut to the length it was trained on (manifest ``max_length``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adapters.artifact import AdapterArtifact, AdapterManifest
from adapters.base import tiny_base
from adapters.errors import ArtifactError
from adapters.synthetic import random_artifact
from adapters.training import Hyperparameters, train
from tests.test_pooling import engine_on, publish
from tests.training_data import FAST_HP, sentiment

LABELS = ("neg", "pos")
LONG = ["good " * 20 + "bad " * 30, "bad " * 25 + "good " * 25, "fine " * 45 + "awful", "short one"]


def test_a_trained_length_is_recorded_and_served_with_the_same_cut(tmp_path):
    base = tiny_base(seed=1, initializer_range=0.3)  # serves at max_length 32
    assert base.max_length == 32
    tr, va = sentiment(40, seed=0), sentiment(12, seed=1)
    ids = {n: i for i, n in enumerate(LABELS)}
    res = train(base, [r["text"] for r in tr] + LONG[:2], [ids[r["label"]] for r in tr] + [0, 1], LABELS,
                [r["text"] for r in va], [ids[r["label"]] for r in va], method="lora",
                hp=Hyperparameters.from_dict({**FAST_HP, "epochs": 2, "max_length": 64}), threads=1)
    assert res.artifact.manifest.max_length == 64
    assert AdapterManifest.from_dict(res.artifact.manifest.to_dict()).max_length == 64
    with torch.inference_mode():
        trained = res.model(**base.tokenize(LONG, max_length=64)).logits
        cut_short = res.model(**base.tokenize(LONG, max_length=32)).logits
    assert (trained[:3] - cut_short[:3]).abs().max() > 1e-4  # the long rows' tail matters
    engine, catalog = engine_on(tmp_path, tiny_base(seed=1, initializer_range=0.3))
    loaded = publish(engine, catalog, "long", res.artifact)
    batch = engine.serving.collate(LONG, [loaded] * len(LONG))
    assert batch["input_ids"].shape[1] > 32
    served = torch.stack(engine.forward(batch, [loaded] * len(LONG)).logits)
    assert (served - trained).abs().max().item() <= 1e-5
    # the request path (predict_rows) cuts the same way
    preds = engine.predict_rows(LONG, [loaded] * len(LONG))
    assert [p.label for p in preds] == [LABELS[i] for i in trained.argmax(-1).tolist()]


def test_mixed_lengths_in_one_batch_each_row_as_alone_and_old_manifests_at_the_base_length(tmp_path):
    base = tiny_base(seed=2)
    engine, catalog = engine_on(tmp_path, base)
    old = random_artifact(base.spec, seed=1, n_labels=2)  # as published before: no length recorded
    assert old.manifest.max_length is None and "max_length" not in old.manifest.to_dict()
    long_art = random_artifact(base.spec, seed=2, n_labels=3)
    long_art = AdapterArtifact(manifest=replace(long_art.manifest, max_length=60), weights=long_art.weights)
    a, b = publish(engine, catalog, "old", old), publish(engine, catalog, "long", long_art)
    rows = [a, b, None, b]
    batch = engine.serving.collate(LONG, rows)
    widths = batch["attention_mask"].sum(1).tolist()
    assert widths[0] == 32 and widths[2] == 32 and widths[1] > 32 and widths[3] == len(base.tokenize([LONG[3]])["input_ids"][0])
    out = engine.forward(batch, rows)
    for i, row in enumerate(rows):
        if row is not None:
            alone = engine.forward(engine.serving.collate([LONG[i]], [row]), [row]).logits[0]
            assert (alone - out.logits[i]).abs().max().item() <= 1e-5, i
    # a length past the model's positions is cut to them (never an index error in the forward)
    huge = AdapterArtifact(manifest=replace(long_art.manifest, max_length=60_000), weights=long_art.weights)
    c = publish(engine, catalog, "huge", huge)
    positions = base.model.config.max_position_embeddings
    assert engine.serving.collate(["word " * (positions + 50)], [c])["input_ids"].shape[1] == positions
    # an old adapter's rows are exactly what the base's tokenizer call gives
    plain = engine.serving.collate(LONG, [a] * len(LONG))
    ref = base.tokenize(LONG)
    assert all(torch.equal(plain[k], ref[k]) for k in ref)


@pytest.mark.parametrize("bad", [0, "64", 2.5, True])
def test_a_bad_recorded_length_is_refused(bad):
    m = random_artifact(tiny_base(seed=1).spec, seed=1).manifest.to_dict()
    m["max_length"] = bad
    with pytest.raises(ArtifactError, match="max_length"):
        AdapterManifest.from_dict(m)
