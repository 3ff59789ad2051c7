"""Issue 13's serving checks on a base read from disk: an adapter trained on a sentence-transformers
layout (a tiny random BERT saved with a pooling config) is served with the very logits it had at
training time, alone and in a mixed batch; and an adapter whose registry manifest predates the
issue's fields (no ``pooling``, no ``lora.use_rslora``) is still served as before: with the model's
own pooler and alpha / r, on a base whose configuration says mean pooling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import select, update

from adapters.artifact import AdapterArtifact
from adapters.base import load_base
from adapters.catalog import Catalog
from adapters.pooling import POOLER, pool_tokens
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.schema.tables import adapter_versions
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from adapters.training import Hyperparameters, train
from tests.test_pooling import LABELS, MEAN, TEXTS, st_layout
from tests.training_data import FAST_HP, sentiment


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return st_layout(tmp_path_factory.mktemp("st") / "model", {"pooling_mode_mean_tokens": True})


def serving(tmp_path, layout):
    """A server's half: its own base loaded from the layout, its own registry and store files."""
    registry = Registry(f"sqlite:///{tmp_path}/tailor.db")
    catalog = Catalog(registry, LocalStore(tmp_path / "store"))
    if not registry.list_tenants():
        registry.create_tenant("acme")
    return Engine(load_base(str(layout), max_length=32), catalog), catalog


def serve(engine, catalog, name, art, texts):
    catalog.publish("acme", name, art, promote=True, spec=engine.base.spec)
    row = engine.acquire(engine.resolve("acme", name))
    return torch.stack(engine.forward(engine.base.tokenize(texts), [row] * len(texts)).logits), row


def test_an_adapter_trained_on_a_sentence_transformers_layout_serves_its_training_logits(tmp_path, layout):
    trainer_base = load_base(str(layout), max_length=32)
    assert trainer_base.spec.pooling == MEAN  # read from modules.json and 1_Pooling/config.json
    tr, va = sentiment(60, seed=0), sentiment(20, seed=1)
    ids = {n: i for i, n in enumerate(LABELS)}
    res = train(trainer_base, [r["text"] for r in tr], [ids[r["label"]] for r in tr], LABELS,
                [r["text"] for r in va], [ids[r["label"]] for r in va], method="lora",
                hp=Hyperparameters.from_dict({**FAST_HP, "epochs": 3}), threads=1)
    assert res.artifact.manifest.pooling == MEAN
    texts = [r["text"] for r in va] + TEXTS
    with torch.inference_mode():
        trained = res.model(**trainer_base.tokenize(texts)).logits
    engine, catalog = serving(tmp_path, layout)
    assert engine.base.spec.fingerprint == trainer_base.spec.fingerprint and engine.base.spec.pooling == MEAN
    served, row = serve(engine, catalog, "sent", res.artifact, texts)
    assert (served - trained).abs().max().item() <= 1e-5
    # mixed with another tenant's pooler adapter and base rows, each row is still its own
    other = random_artifact(engine.base.spec, seed=4, n_labels=3)
    _, other_row = serve(engine, catalog, "other", other, texts[:1])
    rows = [row, other_row, None, row]
    inputs = engine.base.tokenize(texts[:4])
    mixed = engine.forward(inputs, rows)
    for i in (0, 3):
        assert (mixed.logits[i] - trained[i]).abs().max().item() <= 1e-5
    with torch.inference_mode():
        hidden = load_base(str(layout), max_length=32).model.bert(**inputs).last_hidden_state
    mean = F.normalize(pool_tokens("mean", hidden, inputs["attention_mask"]), dim=-1)
    assert torch.allclose(mixed.features[2], mean[2], atol=1e-5)  # a base row: the layout's pooling


def test_an_adapter_whose_manifest_predates_pooling_and_rslora_is_served_as_before(tmp_path, layout):
    engine, catalog = serving(tmp_path, layout)
    art = random_artifact(engine.base.spec, seed=1, n_labels=2, targets=("query", "key", "value"))
    assert art.manifest.pooling == POOLER and not art.manifest.lora.use_rslora
    before, _ = serve(engine, catalog, "old", art, TEXTS)
    # the registry row as a version published before issue 13 wrote it: neither field
    with catalog.registry.engine.begin() as conn:
        row_id, manifest = conn.execute(select(adapter_versions.c.id, adapter_versions.c.manifest)).one()
        old = {k: v for k, v in manifest.items() if k != "pooling"}
        old["lora"] = {k: v for k, v in manifest["lora"].items() if k != "use_rslora"}
        conn.execute(update(adapter_versions).where(adapter_versions.c.id == row_id).values(manifest=old))
    fresh, catalog2 = serving(tmp_path, layout)  # a server started after the upgrade
    record = catalog2.registry.get_version("acme", "old", 1)
    assert "pooling" not in record.manifest and "use_rslora" not in record.manifest["lora"]
    loaded = fresh.acquire(fresh.resolve("acme", "old"))
    assert loaded.pooling == POOLER and loaded.scale == art.manifest.lora.alpha / art.manifest.lora.r
    after = torch.stack(fresh.forward(fresh.base.tokenize(TEXTS), [loaded] * len(TEXTS)).logits)
    assert torch.equal(after, before)
    # and the pooling it is served with matters on this base: read as mean pooling it would differ
    as_mean = AdapterArtifact(manifest=replace(art.manifest, pooling=MEAN), weights=art.weights)
    mean_logits, _ = serve(fresh, catalog2, "as-mean", as_mean, TEXTS)
    assert (mean_logits - after).abs().max().item() > 1e-3
