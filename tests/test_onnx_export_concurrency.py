"""A background ONNX export does not change a torch forward running beside it.

``torch.onnx.export`` (the legacy exporter) sets ``torch.onnx.is_in_onnx_export()`` for the whole
process while it runs, and graph variants are exported on a background thread while serving
threads run torch forwards. Nothing on the forward path reads that flag (torch.nn, transformers'
BERT and peft do not; neither do Tailor's LoRA layers), and what does change the forward path
under the exporter -- the tracing state that sends ``Module.__call__`` to ``_slow_forward`` and
the scope map it records into -- is per thread. This test holds an export mid-trace (a forward
pre-hook in the export thread waits) and, while the flag is up, runs the serving engine's
mixed forward on another thread: no tracing state there, and the very same logits as before
the export started.
"""

from __future__ import annotations

import threading

import torch

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.export import export_text_graph
from adapters.store import LocalStore
from adapters.synthetic import random_artifact

TEXTS = ["good morning", "a dreadful film, truly awful", "taxes and budgets", "rates rise again"]


def test_a_forward_beside_a_background_export_is_unchanged(tmp_path):
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    engine = Engine(tiny_base(seed=3), catalog, EngineConfig(max_resident=4, device_slots=9, max_batch_size=8,
                                                             tune_allocator=False))
    catalog.publish("acme", "a", random_artifact(engine.base.spec, r=4, targets=("query", "dense"), n_labels=3,
                                                 seed=1, std=0.2), promote=True, spec=engine.base.spec)
    adapter = engine.acquire(engine.resolve("acme", "a"))
    rows = [adapter, None, adapter, adapter]
    batch = engine.serving.collate(TEXTS)

    def logits() -> torch.Tensor:  # the adapted rows' (a base row has no head of its own)
        return torch.stack([x for x in engine.forward(batch, rows).logits if x is not None])

    before = logits()

    exporting, served = threading.Event(), threading.Event()
    result: dict[str, object] = {}

    def hold(module: torch.nn.Module, args: object) -> None:
        if threading.current_thread() is exporter and not exporting.is_set() and torch.onnx.is_in_onnx_export():
            exporting.set()
            served.wait(timeout=120)

    def export() -> None:
        try:
            result["graph"] = export_text_graph(engine.base)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hold)
    exporter = threading.Thread(target=export)
    try:
        exporter.start()
        assert exporting.wait(timeout=120), result.get("error")
        # the exporter is mid-trace: the flag is up for the whole process ...
        assert torch.onnx.is_in_onnx_export()
        during = logits()
        # ... but this thread does not trace, and its forward is the one it was before
        assert torch._C._get_tracing_state() is None and not torch.jit.is_tracing()
        assert torch.equal(during, before)
    finally:
        served.set()
        exporter.join(timeout=300)
        handle.remove()
    assert isinstance(result.get("graph"), bytes) and result["graph"], result.get("error")
    assert not torch.onnx.is_in_onnx_export()
    assert torch.equal(logits(), before)
