"""ONNX Runtime vs torch on the same mixed batches: fp32 logits within 1e-4.

A tiny random BERT (fast): three adapters of different ranks (2/4/3), target sets
(query+value / every dense layer incl. the pooler / key), label counts (2/5/3) and poolings
(pooler / mean / cls; a fourth adapter pools every layer), with base rows, through the real engine (registry, store, slots) with
its serving swapped for ``OnnxTextServing``: first on the universal graph, then on the graph
variant of the batch's target set once built. The real MiniLM runs in the slow tests.
"""

from __future__ import annotations

import dataclasses

import pytest

from adapters.base import load_base, tiny_base
from adapters.catalog import Catalog
from adapters.pooling import Pooling
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.runtime import RuntimeChoice, apply_runtime
from adapters.runtime.onnx.serving import OnnxTextServing
from adapters.store import LocalStore
from adapters.synthetic import random_artifact

TEXTS = ["good morning", "a dreadful film, truly awful", "taxes and budgets", "the cup final went on and on",
         "so-so service", "x", "Grüße aus Köln 🙂", "rates rise again"]
KINDS = [  # (r, targets, labels, pooling)
    (2, ("query", "value"), 2, "pooler"),
    (4, ("dense",), 5, "mean"),
    (3, ("key",), 3, "cls"),
    (2, ("value",), 4, "mean+all_layers"),  # the head method's pooling: the graph's layers_mean output
]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """One graph cache for the module: each base is exported once, then read back."""
    return tmp_path_factory.mktemp("graphs")


def _engines(tmp_path, base_factory, precision="none", std=0.2, graphs=None):
    """A torch engine and an ONNX engine over one registry/store, on two copies of one base."""
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    torch_base, onnx_base = base_factory(), base_factory()
    config = EngineConfig(max_resident=16, device_slots=17, max_batch_size=16, tune_allocator=False)
    te = Engine(torch_base, catalog, config)
    oe = Engine(onnx_base, catalog, config)
    report = apply_runtime(oe, RuntimeChoice("onnx", precision), graphs or tmp_path / "graphs")
    assert report.runtime == "onnx", report.reason
    assert isinstance(oe.serving, OnnxTextServing)
    for i, (r, targets, n_labels, pooling) in enumerate(KINDS):
        art = random_artifact(torch_base.spec, r=r, targets=targets, n_labels=n_labels, seed=10 + i, std=std)
        art = dataclasses.replace(art, manifest=dataclasses.replace(art.manifest, pooling=Pooling.parse(pooling)))
        catalog.publish("acme", f"a{i}", art, promote=True, spec=torch_base.spec)
    return te, oe


def _mixed(engine, rows_spec):
    loaded = {i: engine.acquire(engine.resolve("acme", f"a{i}")) for i in range(len(KINDS))}
    rows = [None if k is None else loaded[k] for k in rows_spec]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(rows))]
    return engine.forward(engine.serving.collate(texts), rows)


def _max_diff(a, b):
    worst = 0.0
    for x, y in zip(a.logits, b.logits):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape
            worst = max(worst, float((x - y).abs().max()))
    return max(worst, float((a.features - b.features).abs().max()))


def _has_variant(engine, rows_spec):
    """Whether the engine holds a graph adapting exactly the layers these rows' adapters adapt
    (the universal graph is that graph when they adapt every layer; base rows need none)."""
    needed = frozenset(p for k in set(rows_spec) if k is not None
                       for p in engine.acquire(engine.resolve("acme", f"a{k}")).lora)
    return not needed or any(v.layout.modules == needed for v in engine.serving.graphs.ready())


ROW_SETS = {
    "mixed with base rows": [0, 1, None, 2, 0, None, 1, 2],
    "one adapter (single plan)": [1, 1, 1, 1],
    "base rows only": [None, None, None],
    "two adapters": [2, 0, 2, 0, 0],
}


@pytest.mark.parametrize("rows", list(ROW_SETS.values()), ids=list(ROW_SETS))
def test_tiny_base_fp32_matches_torch(tmp_path, graphs, rows):
    te, oe = _engines(tmp_path, lambda: tiny_base(seed=3, initializer_range=0.2), graphs=graphs)
    diff = _max_diff(_mixed(te, rows), _mixed(oe, rows))
    assert diff <= 1e-4, diff
    assert oe.serving.graphs.settle(timeout=600)  # then on the graph variant of the batch's target set
    assert _has_variant(oe, rows)
    diff = _max_diff(_mixed(te, rows), _mixed(oe, rows))
    assert diff <= 1e-4, diff


def test_tiny_base_mean_pooled_base_rows(tmp_path):
    """A base whose own pooling is mean+normalize: base rows pool like it on both runtimes."""
    factory = lambda: tiny_base(seed=4, initializer_range=0.2, pooling=Pooling.parse("mean+normalize"))  # noqa: E731
    te, oe = _engines(tmp_path, factory)
    rows = [None, 0, None, 1, 2]
    assert _max_diff(_mixed(te, rows), _mixed(oe, rows)) <= 1e-4


def test_onnx_predictions_carry_the_same_labels(tmp_path, graphs):
    te, oe = _engines(tmp_path, lambda: tiny_base(seed=3, initializer_range=0.2), graphs=graphs)
    a = [te.acquire(te.resolve("acme", f"a{i}")) for i in range(3)]
    b = [oe.acquire(oe.resolve("acme", f"a{i}")) for i in range(3)]
    texts = TEXTS[:6]
    pt = te.predict_rows(texts, [a[0], a[1], None, a[2], a[1], a[0]])
    po = oe.predict_rows(texts, [b[0], b[1], None, b[2], b[1], b[0]])
    assert [p and p.label for p in pt] == [p and p.label for p in po]
    assert po[2] is None and set(po[1].scores) == {f"label_{i}" for i in range(5)}


@pytest.mark.slow
def test_minilm_fp32_matches_torch(tmp_path):
    te, oe = _engines(tmp_path, load_base, std=0.05)  # trained-adapter-sized weights on every layer
    rows = [0, 1, None, 2, 0, None, 1, 2, 2, 1]
    assert _max_diff(_mixed(te, rows), _mixed(oe, rows)) <= 1e-4
    single = [1, 1, 1]
    assert _max_diff(_mixed(te, single), _mixed(oe, single)) <= 1e-4
    assert oe.serving.graphs.settle(timeout=1800)  # the target-set variants of both batches
    assert _has_variant(oe, rows) and _has_variant(oe, single)
    assert _max_diff(_mixed(te, rows), _mixed(oe, rows)) <= 1e-4
    assert _max_diff(_mixed(te, single), _mixed(oe, single)) <= 1e-4
