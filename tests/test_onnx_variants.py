"""Target-set graph variants: a batch runs on a graph with LoRA branches on exactly its layers.

A tiny random BERT through the real engine (registry, store, slots) on ONNX: the first batch
of a target set runs on the universal graph and queues that set's variant; once built (awaited
with ``settle``, never a sleep) the same batch runs on it, within 1e-4 of torch, and the
variant is in the graph cache under its target set, reused by a restart, read (never built)
by a ``variants="cached"`` engine, refused under another set's key; a build that fails leaves
the covering graph serving.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.choice import RuntimeChoice
from adapters.runtime.onnx.graph_cache import GraphCache, GraphKey
from adapters.runtime.onnx.layout import GraphLayout
from adapters.runtime.onnx.runtime import apply_runtime, build_graphs
from adapters.runtime.onnx.variants import GraphVariants
from adapters.store import LocalStore
from adapters.synthetic import random_artifact

TEXTS = ["good morning", "a dreadful film, truly awful", "taxes and budgets", "so-so service", "x", "rates rise"]
CONFIG = EngineConfig(max_resident=8, device_slots=9, max_batch_size=8, tune_allocator=False)
KINDS = [(2, ("query", "value"), 2), (4, ("query", "value"), 3), (3, ("dense",), 4)]


def _base():
    return tiny_base(seed=3, initializer_range=0.2, num_layers=2)


@pytest.fixture()
def catalog(tmp_path):
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    spec = _base().spec
    for i, (r, targets, n) in enumerate(KINDS):
        catalog.publish("acme", f"a{i}", random_artifact(spec, r=r, targets=targets, n_labels=n, seed=i, std=0.2),
                        promote=True, spec=spec)
    return catalog


def _onnx(catalog, graphs, **kw):
    engine = Engine(_base(), catalog, CONFIG)
    report = apply_runtime(engine, RuntimeChoice("onnx", kw.pop("quantize", "none")), graphs, **kw)
    assert report.runtime == "onnx", report.reason
    return engine


def _forward(engine, kinds):
    """(the engine's output for these rows, the graph it picked for them first: ONNX only)."""
    rows = [None if k is None else engine.acquire(engine.resolve("acme", f"a{k}")) for k in kinds]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(rows))]
    batch = engine.serving.collate(texts)
    picked = None
    if hasattr(engine.serving, "variant"):
        with torch.inference_mode():
            picked = engine.serving.variant(engine.slots.plan(rows))  # before any build it may queue
    return engine.forward(batch, rows), picked


def _diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits) if x is not None)


def _sidecars(graphs):
    return [json.loads(f.read_text()) for f in sorted(graphs.glob("*.json"))]


def test_a_batch_runs_on_the_variant_of_its_target_set(tmp_path, catalog):
    graphs = tmp_path / "graphs"
    te = Engine(_base(), catalog, CONFIG)
    oe = _onnx(catalog, graphs)
    qv = frozenset(te.base.spec.match_target("query") + te.base.spec.match_target("value"))
    kinds = [0, 1, None, 1, 0]  # two query/value adapters of different ranks, and a base row
    first, used = _forward(oe, kinds)
    assert used is oe.serving.graphs.first and used.layout.targets is None  # universal until built
    assert _diff(first, _forward(te, kinds)[0]) <= 1e-4
    assert oe.serving.graphs.settle(timeout=600)
    out, used = _forward(oe, kinds)
    assert used is not oe.serving.graphs.first and used.layout.modules == qv and used.built_seconds > 0
    lora_inputs = {i.name for i in used.session.get_inputs() if i.name.startswith("lora_b.")}
    assert lora_inputs == {"lora_b." + m for m in qv}  # no branch at all on the other layers
    assert _diff(out, _forward(te, kinds)[0]) <= 1e-4
    # stored beside the universal graph, under its own target set, after the same parity check
    variant_meta = [m for m in _sidecars(graphs) if m["key"]["targets"] != "*"]
    assert [m["key"]["targets"].split(",") for m in variant_meta] == [sorted(qv)]
    assert variant_meta[0]["parity_max_abs_diff"] <= 1e-4

    # a batch adding a dense adapter needs the union: the union's graph, while q/v keeps its own
    mixed, used = _forward(oe, [0, 2, None, 1])
    assert used.layout.targets is None  # covered by the universal graph until its variant is ready
    assert oe.serving.graphs.settle(timeout=600)
    again, used = _forward(oe, [0, 2, None, 1])
    assert used.layout.modules == qv | frozenset(te.base.spec.match_target("dense"))
    assert _diff(again, _forward(te, [0, 2, None, 1])[0]) <= 1e-4
    assert _forward(oe, [1, 1, 0])[1].layout.modules == qv


def test_variants_are_reused_across_restarts_and_read_only_by_the_gate(tmp_path, catalog, caplog):
    graphs = tmp_path / "graphs"
    first = _onnx(catalog, graphs)
    _forward(first, [0, 1])
    assert first.serving.graphs.settle(timeout=600)
    files = {f.name: f.stat().st_mtime_ns for f in graphs.glob("*.onnx")}
    assert len(files) == 2

    restarted = _onnx(catalog, graphs)
    _forward(restarted, [0, 1])
    assert restarted.serving.graphs.settle(timeout=600)
    assert _forward(restarted, [0, 1])[1].layout.targets is not None  # the cached variant, read back
    assert {f.name: f.stat().st_mtime_ns for f in graphs.glob("*.onnx")} == files  # nothing rebuilt

    gate = _onnx(catalog, graphs, variants="cached")
    _forward(gate, [0, 1])
    _forward(gate, [2, 2])  # a set no serving process has built: read-only, so not exported here
    assert gate.serving.graphs.settle(timeout=600)
    assert _forward(gate, [0, 1])[1].layout.targets is not None
    assert _forward(gate, [2, 2])[1].layout.targets is None  # the universal graph serves it
    assert set(f.name for f in graphs.glob("*.onnx")) == set(files)

    off = _onnx(catalog, graphs, variants="off")
    _forward(off, [0, 1])
    assert off.serving.graphs.settle(timeout=1) and len(off.serving.graphs.ready()) == 1
    with pytest.raises(ValueError, match="unknown variants policy 'sometimes'"):
        apply_runtime(Engine(_base(), catalog, CONFIG), RuntimeChoice("onnx"), graphs, variants="sometimes")


def test_a_variant_under_another_sets_key_is_refused(tmp_path, catalog, caplog):
    graphs = tmp_path / "graphs"
    engine = _onnx(catalog, graphs)
    _forward(engine, [0])
    assert engine.serving.graphs.settle(timeout=600)
    spec = engine.base.spec
    qv = frozenset(spec.match_target("query") + spec.match_target("value"))
    cache = GraphCache(graphs)
    variant = cache.load(GraphKey.current(spec.fingerprint, "fp32", 17, qv))
    assert variant is not None
    other = GraphKey.current(spec.fingerprint, "fp32", 17, frozenset(spec.match_target("dense")))
    cache.store(other, variant)  # checksum and sidecar right; the graph adapts other layers
    with caplog.at_level(logging.WARNING):
        assert cache.load(other) is None
    assert "adapts 4 layers, not" in caplog.text


def test_a_failed_build_leaves_the_covering_graph_serving(tmp_path, catalog, caplog):
    graphs = tmp_path / "graphs"
    engine = _onnx(catalog, graphs, variants="off")
    universal = GraphCache(graphs).load(GraphKey.current(engine.base.spec.fingerprint, "fp32", 17))
    calls = []

    def broken(targets):
        calls.append(targets)
        raise RuntimeError("no space left on device")

    variants = GraphVariants(engine.base.spec, universal, build=broken, max_variants=2)
    needed = frozenset(engine.base.spec.match_target("key"))
    with caplog.at_level(logging.WARNING):
        assert variants.pick(needed) is variants.first
        assert variants.settle(timeout=60)
    assert "not built (RuntimeError: no space left on device)" in caplog.text
    assert variants.pick(needed) is variants.first and calls == [needed]  # not retried
    assert variants.pick(frozenset()) is variants.first and len(calls) == 1  # base rows: never built
    with pytest.raises(ValueError, match="not adaptable layers"):
        GraphLayout.of(engine.base.spec, frozenset({"no.such.layer"}))


def test_build_graphs_fills_the_cache_ahead_of_serving(tmp_path, catalog):
    """What a deployment step (or bench.http) runs before servers start: the universal graph and
    the named variants, built synchronously; a serving engine then builds nothing."""
    graphs = tmp_path / "graphs"
    spec = _base().spec
    qv = frozenset(spec.match_target("query") + spec.match_target("value"))
    built = build_graphs(_base(), "int8", graphs, [qv])
    assert built == [(None, True), (qv, True)]
    assert build_graphs(_base(), "int8", graphs, [qv]) == [(None, False), (qv, False)]
    files = {f.name: f.stat().st_mtime_ns for f in graphs.glob("*.onnx")}
    assert len(files) == 4  # fp32 and int8, universal and query/value
    engine = _onnx(catalog, graphs, quantize="int8")
    _forward(engine, [0, 1])
    assert engine.serving.graphs.settle(timeout=600)
    assert _forward(engine, [1, 0])[1].layout.modules == qv
    assert {f.name: f.stat().st_mtime_ns for f in graphs.glob("*.onnx")} == files
