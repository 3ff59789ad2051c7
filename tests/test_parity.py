"""Mixed-tenant batches give, row for row, what peft gives for each adapter alone."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from adapters.artifact import AdapterArtifact
from adapters.base import BaseModel, tiny_base
from adapters.peft_format import export_peft
from adapters.runtime.context import BatchPlan
from adapters.runtime.head import MixedHead
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.lora_layer import wrap_linears
from adapters.runtime.context import use_plan
from adapters.runtime.slots import SlotBank
from adapters.synthetic import random_artifact

TEXTS = [
    "the service was quick and friendly", "terrible, never again", "an ordinary day at the office",
    "I loved every minute of it", "prices went up again this quarter", "the match ended in a draw",
    "new phone, same old battery problems", "what a wonderful surprise",
]


def peft_solo(base: BaseModel, pristine: nn.Module, art: AdapterArtifact, tmp_path, name: str) -> nn.Module:
    """The reference: a fresh copy of the base with this adapter loaded by peft itself."""
    model = copy.deepcopy(pristine)
    setattr(model, base.head_name, nn.Linear(base.spec.head_in_features, len(art.manifest.labels)))
    d = tmp_path / name
    d.mkdir()
    for fname, data in export_peft(art, base.spec).items():
        (d / fname).write_bytes(data)
    return PeftModel.from_pretrained(model, str(d)).eval()


def mixed_forward(base: BaseModel, bank: SlotBank, inputs, rows):
    plan: BatchPlan = bank.plan(rows)
    with torch.inference_mode(), use_plan(plan):
        logits = base.model(**inputs).logits
    return logits, plan.features


@pytest.fixture(scope="module")
def setup():
    base = tiny_base(seed=1)
    pristine = copy.deepcopy(base.model)
    wrap_linears(base.model, list(base.spec.linear_shapes))
    setattr(base.model, base.head_name, MixedHead(base.spec.head_in_features))
    bank = SlotBank(base.spec.linear_shapes, base.spec.head_in_features, 9, base.device, base.dtype)
    arts = {
        "a": random_artifact(base.spec, r=4, targets=("query", "value"), n_labels=2, seed=1),
        "b": random_artifact(base.spec, r=8, targets=("query", "key", "value", "attention.output.dense"),
                             n_labels=7, seed=2),
        "c": random_artifact(base.spec, r=2, targets=("value", "intermediate.dense", "output.dense"),
                             n_labels=3, seed=3, use_rslora=True),
        "d": random_artifact(base.spec, r=16, targets=("query",), n_labels=4, seed=4, alpha=8),
    }
    loaded = {
        k: LoadedAdapter.from_artifact(VersionKey("t", k, 1, str(i)), a, base.dtype)
        for i, (k, a) in enumerate(arts.items())
    }
    return base, pristine, bank, arts, loaded


def test_mixed_batch_matches_peft_solo(setup, tmp_path):
    base, pristine, bank, arts, loaded = setup
    names = ["a", "b", None, "c", "d", "a", "b", "c"]
    inputs = base.tokenize(TEXTS)
    logits, features = mixed_forward(base, bank, inputs, [None if n is None else loaded[n] for n in names])
    for name in "abcd":
        ref = peft_solo(base, pristine, arts[name], tmp_path, name)
        with torch.inference_mode():
            want = ref(**inputs).logits
        n_labels = len(arts[name].manifest.labels)
        for row, row_name in enumerate(names):
            if row_name == name:
                diff = (logits[row, :n_labels] - want[row]).abs().max().item()
                assert diff <= 1e-5, f"adapter {name} row {row}: max diff {diff}"
    # the base row gets exactly the base model's pooled features
    with torch.inference_mode():
        base_pooled = pristine.bert(**inputs).pooler_output
    assert (features[2] - base_pooled[2]).abs().max().item() <= 1e-6


def test_adapters_really_change_outputs(setup):
    base, _, bank, _, loaded = setup
    inputs = base.tokenize(TEXTS[:2])
    _, f_base = mixed_forward(base, bank, inputs, [None, None])
    _, f_a = mixed_forward(base, bank, inputs, [loaded["a"], loaded["a"]])
    assert (f_a - f_base).abs().max().item() > 1e-3


def test_single_adapter_batch_equals_mixed(setup):
    """The one-adapter fast path (plain matmuls) agrees with the gathered path."""
    base, _, bank, _, loaded = setup
    inputs = base.tokenize(TEXTS)
    solo, _ = mixed_forward(base, bank, inputs, [loaded["b"]] * len(TEXTS))
    mixed, _ = mixed_forward(base, bank, inputs, [loaded["b"]] * (len(TEXTS) - 1) + [loaded["a"]])
    assert (solo[:-1, :7] - mixed[:-1, :7]).abs().max().item() <= 1e-5


def test_eviction_and_reuse_of_slots_keeps_parity(setup, tmp_path):
    """More adapters than slots: slots are recycled (zeroed, rewritten) without leaking weights."""
    base, pristine, _, _, _ = setup
    bank = SlotBank(base.spec.linear_shapes, base.spec.head_in_features, 3, base.device, base.dtype)
    arts = [random_artifact(base.spec, r=2 + 2 * (i % 3), targets=("query", "value") if i % 2 else ("key",),
                            n_labels=2 + i % 4, seed=10 + i) for i in range(6)]
    loaded = [LoadedAdapter.from_artifact(VersionKey("t", f"x{i}", 1, "s"), a, base.dtype) for i, a in enumerate(arts)]
    inputs = base.tokenize(TEXTS[:2])
    got = {}
    for i in range(6):
        for j in (i, (i + 1) % 6):
            logits, _ = mixed_forward(base, bank, inputs, [loaded[i], loaded[j]])
            got.setdefault(i, logits[0, : 2 + i % 4])
            assert torch.allclose(got[i], logits[0, : 2 + i % 4], atol=1e-6)
    assert bank.evictions > 0
    for i in (0, 5):
        ref = peft_solo(base, pristine, arts[i], tmp_path, f"x{i}")
        with torch.inference_mode():
            want = ref(**inputs).logits[0]
        assert (got[i] - want).abs().max().item() <= 1e-5
