"""Image tasks through the same ONNX seam: 1x1-conv LoRA as graph inputs, per-row heads in torch.

A tiny random vision base (EfficientNet-Lite0's layout): three adapters on different pointwise
convs with different ranks and label counts, plus base rows, in one batch: ONNX fp32 logits
equal torch's within 1e-4."""

from __future__ import annotations

import torch

from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.choice import RuntimeChoice
from adapters.runtime.onnx.runtime import apply_runtime
from adapters.runtime.onnx.serving_image import OnnxImageServing
from adapters.store import LocalStore
from adapters.synthetic import random_image_artifact
from adapters.vision.backbone import tiny_vision_base

CONFIG = EngineConfig(max_resident=8, device_slots=9, max_batch_size=8, tune_allocator=False)


def test_tiny_vision_base_fp32_matches_torch(tmp_path):
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    te = Engine(tiny_vision_base(seed=2), catalog, CONFIG)
    oe = Engine(tiny_vision_base(seed=2), catalog, CONFIG)
    report = apply_runtime(oe, RuntimeChoice("onnx"), tmp_path / "graphs")
    assert report.runtime == "onnx", report.reason
    assert isinstance(oe.serving, OnnxImageServing)
    kinds = [(2, ("_expand_conv",), 2), (4, ("_project_conv", "_conv_head"), 5), (3, ("_conv_head",), 3)]
    for i, (r, targets, n) in enumerate(kinds):
        catalog.publish("acme", f"a{i}", random_image_artifact(te.base.spec, r=r, targets=targets, n_labels=n,
                                                               seed=i, std=0.2), promote=True, spec=te.base.spec)
    images = te.serving.probe_rows()[:6]
    features = {}
    for pattern in ([0, 1, None, 2, 1, None], [1, 1, 1, 1, 1, 1], [None] * 6):
        outs = []
        for e in (te, oe):
            loaded = [None if k is None else e.acquire(e.resolve("acme", f"a{k}")) for k in pattern]
            outs.append(e.forward(e.serving.collate(images), loaded))
        t, o = outs
        assert float((t.features - o.features).abs().max()) <= 1e-4
        for x, y in zip(t.logits, o.logits):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.shape == y.shape and float((x - y).abs().max()) <= 1e-4
        features[tuple(pattern)] = o.features
    # the LoRA inputs reached the graph: adapter rows' features differ from the base's, base rows' do not
    mixed, plain = features[(0, 1, None, 2, 1, None)], features[(None,) * 6]
    assert all(float((mixed[i] - plain[i]).abs().max()) > 1e-3 for i in (0, 1, 3, 4))
    assert torch.equal(mixed[2], plain[2]) or float((mixed[2] - plain[2]).abs().max()) <= 1e-6
