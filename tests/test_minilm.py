"""The real bundled MiniLM base: loads offline, fingerprints stably, serves mixed batches like peft."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from adapters.base import load_base
from adapters.catalog import Catalog
from adapters.peft_format import export_peft
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from adapters.synthetic import random_artifact

pytestmark = pytest.mark.slow

TEXTS = ["The film was a delight from start to finish.", "Shares fell sharply after the results.",
         "What a waste of two hours.", "The striker scored twice in the second half."]


def test_minilm_mixed_batch_matches_peft(tmp_path):
    base = load_base()
    assert base.spec.name and base.spec.head_in_features == 384
    assert len([p for p in base.spec.linear_shapes if p.endswith("attention.self.query")]) == 6
    assert not any(p.requires_grad for p in base.model.parameters()) and not base.model.training
    pristine = copy.deepcopy(base.model)
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/r.db"), LocalStore(tmp_path / "s"))
    catalog.registry.create_tenant("acme")
    engine = Engine(base, catalog)
    arts = {"sent": random_artifact(base.spec, r=8, n_labels=2, seed=1),
            "topic": random_artifact(base.spec, r=4, targets=("query", "key", "value"), n_labels=5, seed=2)}
    loaded = {}
    for name, art in arts.items():
        catalog.publish("acme", name, art, promote=True, spec=base.spec)
        loaded[name] = engine.acquire(engine.resolve("acme", name))
    rows = ["sent", "topic", "topic", "sent"]
    inputs = base.tokenize(TEXTS)
    out = engine.forward(inputs, [loaded[r] for r in rows])
    for name, art in arts.items():
        model = copy.deepcopy(pristine)
        model.classifier = nn.Linear(384, len(art.manifest.labels))
        d = tmp_path / name
        d.mkdir()
        for fname, data in export_peft(art, base.spec).items():
            (d / fname).write_bytes(data)
        ref = PeftModel.from_pretrained(model, str(d)).eval()
        with torch.inference_mode():
            want = ref(**inputs).logits
        for i, r in enumerate(rows):
            if r == name:
                assert (out.logits[i] - want[i]).abs().max().item() <= 1e-5


def test_minilm_pooling_comes_from_its_sentence_transformers_config():
    from adapters.pooling import Pooling

    spec = load_base().spec
    assert spec.pooling == Pooling("mean", normalize=True) and spec.pools_tokens  # modules.json + 1_Pooling


def test_minilm_fingerprint_is_stable():
    assert load_base().spec.fingerprint == load_base().spec.fingerprint
