"""GPU checks (run where CUDA is present; skipped elsewhere): parity on device, bf16 serving."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from adapters.base import load_base
from adapters.peft_format import export_peft
from adapters.runtime.context import use_plan
from adapters.runtime.head import MixedHead
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.lora_layer import wrap_linears
from adapters.runtime.slots import SlotBank
from adapters.synthetic import random_artifact

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TEXTS = ["a fine day", "awful service", "markets rallied", "the final whistle", "meh"] * 4


def served_logits(dtype: str, arts, tmp_path):
    base = load_base(device="cuda", dtype=dtype)
    wrap_linears(base.model, list(base.spec.linear_shapes))
    base.model.classifier = MixedHead(base.spec.head_in_features)
    bank = SlotBank(base.spec.linear_shapes, 384, 9, base.device, base.dtype)
    loaded = [LoadedAdapter.from_artifact(VersionKey("t", f"a{i}", 1, "x"), a, base.dtype) for i, a in enumerate(arts)]
    rows = [loaded[i % len(loaded)] for i in range(len(TEXTS))]
    inputs = base.tokenize(TEXTS)
    plan = bank.plan(rows)
    with torch.inference_mode(), use_plan(plan):
        return base.model(**inputs).logits.float().cpu(), inputs


def peft_logits(art, inputs, tmp_path, name):
    base = load_base(device="cuda", dtype="float32")
    model = copy.deepcopy(base.model)
    model.classifier = nn.Linear(384, len(art.manifest.labels))
    d = tmp_path / name
    d.mkdir()
    for fname, data in export_peft(art, base.spec).items():
        (d / fname).write_bytes(data)
    ref = PeftModel.from_pretrained(model, str(d)).to("cuda").eval()
    with torch.inference_mode():
        return ref(**inputs).logits.float().cpu()


def test_fp32_parity_on_gpu(tmp_path):
    spec = load_base(device="cpu").spec
    arts = [random_artifact(spec, r=8, seed=i, n_labels=2 + i) for i in range(3)]
    got, inputs = served_logits("float32", arts, tmp_path)
    for i, art in enumerate(arts):
        want = peft_logits(art, inputs, tmp_path, f"a{i}")
        for row in range(i, len(TEXTS), len(arts)):
            assert (got[row, : 2 + i] - want[row]).abs().max().item() <= 1e-4  # TF32 matmuls on GPU


def test_bf16_serving_close_to_fp32(tmp_path):
    spec = load_base(device="cpu").spec
    arts = [random_artifact(spec, r=8, seed=i) for i in range(4)]
    fp32, _ = served_logits("float32", arts, tmp_path)
    bf16, _ = served_logits("bfloat16", arts, tmp_path)
    assert (fp32 - bf16).abs().max().item() < 0.1
    assert (fp32.argmax(-1) == bf16.argmax(-1)).float().mean().item() >= 0.9
