"""int8: only the base's weight matmuls are quantised (LoRA and heads stay fp32), predictions
agree with torch fp32, and the promotion gate scores candidates on the runtime and precision
that will serve them (the worker gets the service's runtime on its command line)."""

from __future__ import annotations

import types

import onnx

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.jobs import gate
from adapters.jobs.supervisor import worker_args
from adapters.jobs.task_bases import scoring_engine
from adapters.jobs.worker import parse_args
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.choice import RuntimeChoice
from adapters.runtime.onnx.graph_cache import GraphCache, GraphKey
from adapters.runtime.onnx.quantize import DEFAULT_RECIPE, kept_fp32, weight_matmuls
from adapters.runtime.onnx.runtime import apply_runtime
from adapters.store import LocalStore
from adapters.synthetic import random_artifact

TEXTS = [f"{w} {i} and some words about {v}" for i, (w, v) in enumerate(
    [("great", "food"), ("awful", "rates"), ("calm", "weather"), ("fast", "cars"), ("slow", "service"),
     ("cheap", "flights"), ("rude", "staff"), ("lovely", "views")] * 4)]
CONFIG = EngineConfig(max_resident=8, device_slots=33, max_batch_size=32, tune_allocator=False)


def _world(tmp_path):
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    base = tiny_base(seed=8, initializer_range=0.2)
    for i, (r, targets, n) in enumerate([(4, ("query", "value"), 2), (8, ("dense",), 4)]):
        catalog.publish("acme", f"a{i}", random_artifact(base.spec, r=r, targets=targets, n_labels=n, seed=i, std=0.1),
                        promote=True, spec=base.spec)
    return catalog


def test_int8_quantises_the_base_weights_only_and_agrees_with_torch(tmp_path):
    catalog = _world(tmp_path)
    te = Engine(tiny_base(seed=8, initializer_range=0.2), catalog, CONFIG)
    qe = Engine(tiny_base(seed=8, initializer_range=0.2), catalog, CONFIG)
    report = apply_runtime(qe, RuntimeChoice("onnx", "int8"), tmp_path / "graphs")
    assert report.runtime == "onnx" and report.precision == "int8" and qe.serving.label == "onnx-int8"
    fp = te.base.spec.fingerprint
    cache = GraphCache(tmp_path / "graphs")
    fp32 = onnx.load_from_string(cache.load(GraphKey.current(fp, "fp32", 17)))
    int8 = onnx.load_from_string(cache.load(GraphKey.current(fp, "int8", 17)))
    weights, dynamic = weight_matmuls(fp32)
    # every linear layer of the base: the encoder's as MatMuls, the pooler's (a 2-D input) as a Gemm
    n_linear = len(te.base.spec.linear_shapes)
    assert len(weights) == n_linear - 1 and [n.op_type for n in fp32.graph.node].count("Gemm") == 1
    ops = [n.op_type for n in int8.graph.node]
    kept = kept_fp32(fp32, DEFAULT_RECIPE)  # the recipe's fp32 layers (tests/test_onnx_int8_recipe.py)
    gemm_kept = any(n.op_type == "Gemm" and n.name in kept for n in fp32.graph.node)
    assert ops.count("MatMulInteger") + ops.count("MatMulIntegerToFloat") == n_linear - len(kept)
    assert ops.count("Gemm") == int(gemm_kept)
    # the LoRA down/up projections (and attention's products) stay fp32 MatMuls, by name
    assert {n.name for n in int8.graph.node if n.op_type == "MatMul"} >= set(dynamic)
    # the embeddings stay fp32: every Gather reads an fp32 table, and no int8 tensor is table-sized
    inits = {i.name: i for i in int8.graph.initializer}
    vocab = te.base.model.config.vocab_size
    tables = [inits[n.input[0]] for n in int8.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2]
    assert tables and any(t.dims[0] == vocab for t in tables)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in tables)
    assert not [i.name for i in int8.graph.initializer if i.data_type == onnx.TensorProto.INT8 and vocab in i.dims]
    lora_inputs = {i.name for i in int8.graph.input if i.name.startswith("lora_")}
    consumers = [n for n in int8.graph.node if set(n.input) & lora_inputs]
    assert consumers and all(n.op_type in ("MatMul", "Shape", "Slice", "Gather") for n in consumers), \
        {n.op_type for n in consumers}
    a = [te.acquire(te.resolve("acme", f"a{i}")) for i in range(2)]
    b = [qe.acquire(qe.resolve("acme", f"a{i}")) for i in range(2)]
    rows = [i % 3 for i in range(len(TEXTS))]
    ta = te.forward(te.serving.collate(TEXTS), [None if k == 2 else a[k] for k in rows])
    qa = qe.forward(qe.serving.collate(TEXTS), [None if k == 2 else b[k] for k in rows])
    agree = [int(x.argmax()) == int(y.argmax()) for x, y in zip(ta.logits, qa.logits) if x is not None]
    assert sum(agree) / len(agree) >= 0.9, agree
    diffs = [float((x - y).abs().max()) for x, y in zip(ta.logits, qa.logits) if x is not None]
    assert 0 < max(diffs) < 0.5, diffs  # int8 really ran (not the fp32 graph), and stayed close


def test_the_gate_scores_on_the_serving_runtime(tmp_path):
    catalog = _world(tmp_path)
    graphs = tmp_path / "graphs"
    serving = Engine(tiny_base(seed=8, initializer_range=0.2), catalog, CONFIG)
    apply_runtime(serving, RuntimeChoice("onnx", "int8"), graphs)
    gate_engine = scoring_engine(tiny_base(seed=8, initializer_range=0.2), catalog, RuntimeChoice("onnx", "int8"),
                                 graphs)
    torch_gate = scoring_engine(tiny_base(seed=8, initializer_range=0.2), catalog)
    adapter = gate_engine.acquire(gate_engine.resolve("acme", "a1"))
    labels = [f"label_{i % 4}" for i in range(len(TEXTS))]
    scored = gate.score(gate_engine, adapter, TEXTS, labels)
    assert scored["runtime"] == "onnx-int8" and scored["n"] == len(TEXTS)
    assert gate.score(torch_gate, adapter, TEXTS, labels)["runtime"] == "torch"
    # what the gate measured is exactly what serving answers
    served = serving.classify(TEXTS, [serving.acquire(serving.resolve("acme", "a1"))] * len(TEXTS))
    gated = gate_engine.classify(TEXTS, [adapter] * len(TEXTS))
    assert [p.scores for p in served] == [p.scores for p in gated]
    accuracy = sum(p.label == t for p, t in zip(served, labels)) / len(labels)
    assert scored["accuracy"] == accuracy


def test_workers_get_the_serving_runtime(tmp_path):
    def settings(**kw):
        return types.SimpleNamespace(database_url="sqlite:///x.db", store_url=f"file://{tmp_path}/store",
                                     home=tmp_path, base_model=None, store_gc_hours=6.0,
                                     tasks=("text-classification",), image_base_model=None, **kw)

    args = parse_args(worker_args(settings(runtime="onnx", quantize="int8"), threads=1))
    assert (args.runtime, args.quantize, args.graph_cache) == ("onnx", "int8", tmp_path / "graphs")
    args = parse_args(worker_args(settings(runtime="torch", quantize="none"), threads=1))
    assert (args.runtime, args.quantize, args.graph_cache) == ("torch", "none", None)
    assert "--runtime" not in worker_args(settings(), threads=1)  # settings without a runtime: torch
