"""int8 recipes: the layers a recipe keeps fp32 stay plain fp32 MatMuls in the quantised graph
(every other base weight layer runs as an integer matmul), the graph cache keys int8 graphs by
recipe, so a graph quantised by another recipe (an older default) is never served, and a
per-token recipe makes a row's answer independent of its batch-mates."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.choice import RuntimeChoice
from adapters.runtime.onnx.layout import GraphLayout
from adapters.runtime.onnx.graph_cache import GraphCache, GraphKey, stamp
from adapters.runtime.onnx.quantize import (
    DEFAULT_RECIPE, FFN_OUT, RECIPES, Int8Recipe, kept_fp32, quantize_int8, weight_matmuls,
)
from adapters.runtime.onnx.runtime import apply_runtime, calibration_tokens
from adapters.runtime.onnx.smooth import activation_absmax, smooth
from adapters.store import LocalStore

OPSET = 17


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny base's fp32 graph (exported once), its fingerprint, number of layers, cache and
    the probe texts' token inputs (what serving calibrates smoothing on)."""
    tmp = tmp_path_factory.mktemp("recipe")
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    engine = Engine(tiny_base(seed=8, initializer_range=0.2), catalog,
                    EngineConfig(max_resident=4, device_slots=9, max_batch_size=8, tune_allocator=False))
    assert apply_runtime(engine, RuntimeChoice("onnx", "none"), tmp / "graphs").runtime == "onnx"
    cache = GraphCache(tmp / "graphs")
    fp = engine.base.spec.fingerprint
    graph = cache.load(GraphKey.current(fp, "fp32", OPSET))
    assert graph is not None
    layout = GraphLayout.of(engine.base.spec)
    lora = {n: t.numpy() for n, t in zip(layout.input_names, layout.sample(batch=1, rank=2))}
    return graph, fp, engine.base.model.config.num_hidden_layers, cache, {**calibration_tokens(engine.serving), **lora}


def _quantised(graph: bytes, recipe: Int8Recipe, calibration: dict | None = None,
               ) -> tuple[list[str], list[str], onnx.ModelProto]:
    fp32 = onnx.load_from_string(graph)
    weights = weight_matmuls(fp32)[0] + [n.name for n in fp32.graph.node if n.op_type == "Gemm"]
    return weights, kept_fp32(fp32, recipe), onnx.load_from_string(quantize_int8(graph, recipe, calibration))


def _assert_fp32(q: onnx.ModelProto, kept: list[str], weights: list[str]) -> None:
    nodes = {n.name: n for n in q.graph.node}
    inits = {i.name: i for i in q.graph.initializer}
    for name in kept:  # untouched: the same node, reading its fp32 weight
        node = nodes[name]
        assert node.op_type in ("MatMul", "Gemm"), (name, node.op_type)
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT, name
    assert integer_matmuls(q) == len(weights) - len(kept)


def integer_matmuls(q: onnx.ModelProto) -> int:
    """ORT's quantiser writes ``MatMulInteger``; a per-token recipe ``MatMulIntegerToFloat``."""
    ops = [n.op_type for n in q.graph.node]
    return ops.count("MatMulInteger") + ops.count("MatMulIntegerToFloat")


def test_a_recipe_keeps_its_layers_fp32(exported):
    graph, _, n_layers, _, _ = exported
    recipe = Int8Recipe("keep-ffn-out-and-last", per_channel=True, keep_fp32=(FFN_OUT,), keep_last_layers=1)
    weights, kept, q = _quantised(graph, recipe)
    last = f"layer.{n_layers - 1}/"
    expected = {w for w in weights if re.search(FFN_OUT, w) or last in w}
    assert set(kept) == expected and len(expected) == n_layers + 5  # each FFN output, the last layer's other 5
    assert not any("attention/output" in w for w in kept if last not in w)
    _assert_fp32(q, kept, weights)
    # per channel: the quantised weights carry one scale per output column
    scales = [i for i in q.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert scales


def test_the_default_recipe_keeps_what_it_names_fp32(exported):
    graph, _, _, _, tokens = exported
    weights, kept, q = _quantised(graph, DEFAULT_RECIPE, tokens)
    assert len(kept) < len(weights)
    _assert_fp32(q, kept, weights)


def test_a_recipe_needs_something_to_quantise_and_a_known_weight_type(exported):
    graph, _, _, _, _ = exported
    with pytest.raises(ValueError, match="no weight matmul"):
        quantize_int8(graph, Int8Recipe("everything-kept", keep_fp32=(".",)))
    with pytest.raises(ValueError, match="weight_type"):
        Int8Recipe("bad", weight_type="QInt4")


def test_int8_graphs_are_keyed_by_recipe(exported):
    graph, fp, _, cache, _ = exported
    keys = {name: GraphKey.current(fp, "int8", OPSET, recipe=r) for name, r in RECIPES.items()}
    assert len({k.digest for k in keys.values()}) == len(RECIPES)
    assert GraphKey.current(fp, "int8", OPSET).quantization == DEFAULT_RECIPE.key
    changed = Int8Recipe(DEFAULT_RECIPE.name, per_channel=not DEFAULT_RECIPE.per_channel)  # same name, other fields
    assert GraphKey.current(fp, "int8", OPSET, recipe=changed).digest != GraphKey.current(fp, "int8", OPSET).digest
    # fp32 graphs carry no recipe, and keep the digest they had before the field existed
    k32 = GraphKey.current(fp, "fp32", OPSET, recipe=changed)
    before = {k: v for k, v in asdict(k32).items() if k != "quantization"}
    assert k32.quantization == "" and k32.digest == hashlib.sha256(
        json.dumps(before, sort_keys=True).encode()).hexdigest()[:40]
    # an int8 graph another recipe quantised is in the cache, and not what the default reads
    other = next(r for r in RECIPES.values() if r.key != DEFAULT_RECIPE.key)
    old_key = GraphKey.current(fp, "int8", OPSET, recipe=other)
    cache.store(old_key, stamp(quantize_int8(graph, other), fp, "int8"))
    assert cache.load(old_key) is not None
    assert cache.load(GraphKey.current(fp, "int8", OPSET)) is None
    # nor when its files sit where the default's would be: the sidecar names the other recipe
    default_paths = cache.paths(GraphKey.current(fp, "int8", OPSET))
    for src, dst in zip(cache.paths(old_key), default_paths):
        dst.write_bytes(src.read_bytes())
    assert cache.load(GraphKey.current(fp, "int8", OPSET)) is None


def _feeds(session, inputs: dict, lora: bool) -> dict:
    """Token inputs plus the LoRA inputs (``lora``: a rank-2 branch on every layer, lead 1: every
    row the same adapter; else zero-width: base rows)."""
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("lora_") and not lora:
            shape = (1, i.shape[1], 0) if isinstance(i.shape[1], int) else (1, 0, i.shape[2])
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
        else:
            feeds[i.name] = inputs.get(i.name, np.zeros_like(inputs["input_ids"]))
    return feeds


def test_smoothing_is_exact_in_fp32_and_leaves_the_lora_branches_unscaled(exported):
    graph, _, _, _, tokens = exported
    model = onnx.load_from_string(graph)
    weights, _ = weight_matmuls(model)
    nodes = {n.name: n for n in model.graph.node}
    absmax = activation_absmax(model, sorted({nodes[w].input[0] for w in weights}), tokens)
    assert all(a.ndim == 1 and (a > 0).all() for a in absmax.values())
    smoothed = onnx.load_from_string(graph)
    n = smooth(smoothed, weights, absmax, alpha=0.5)
    assert n == len({nodes[w].input[0] for w in weights})  # one Mul per distinct input (q/k/v share one)
    assert [x.op_type for x in smoothed.graph.node].count("Mul") == [x.op_type for x in model.graph.node].count("Mul") + n
    onnx.checker.check_model(smoothed)
    plain, smooth_s = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                       for m in (model, smoothed))
    for lora in (False, True):  # base rows, then a LoRA branch on every layer: it must still read the unscaled input
        feeds = _feeds(plain, tokens, lora)
        for a, b in zip(plain.run(None, feeds), smooth_s.run(None, feeds)):
            assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))
    # the recipe quantises the smoothed graph, and cannot without calibration tokens
    recipe = Int8Recipe("smoothed", per_channel=True, smooth_alpha=0.5)
    q = onnx.load_from_string(quantize_int8(graph, recipe, tokens))
    assert [x.op_type for x in q.graph.node].count("MatMulInteger") == len(weights) + 1  # and the pooler's Gemm
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(graph, recipe)


def test_per_token_rows_do_not_depend_on_their_batch_mates(exported):
    """One activation scale per tensor: a row's int8 answer moves with what else is in the batch.
    Per token: the row alone and the row among others give the same hidden states."""
    graph, _, _, _, tokens = exported
    n = tokens["input_ids"].shape[0]
    assert n >= 3
    spread = {}
    for recipe in (RECIPES["per-channel"], RECIPES["per-token-smooth-keep-ffn-out"]):
        q = quantize_int8(graph, recipe, tokens)
        session = ort.InferenceSession(q, providers=["CPUExecutionProvider"])
        together = session.run(["hidden"], _feeds(session, tokens, lora=True))[0]
        alone = [session.run(["hidden"], _feeds(session, {k: v if k.startswith("lora_") else v[i:i + 1]
                                                           for k, v in tokens.items()}, lora=True))[0]
                 for i in range(n)]
        spread[recipe.name] = max(float(np.abs(a[0] - together[i]).max()) for i, a in enumerate(alone))
    scale = float(np.abs(together).max())
    assert spread["per-token-smooth-keep-ffn-out"] <= 1e-5 * scale, spread
    assert spread["per-channel"] > 100 * max(spread["per-token-smooth-keep-ffn-out"], 1e-7 * scale), spread


def test_a_per_token_recipe_is_close_to_fp32_and_needs_per_column_weights(exported):
    graph, _, _, _, tokens = exported
    recipe = RECIPES["per-token-smooth"]
    weights, kept, q = _quantised(graph, recipe, tokens)
    assert kept == [n.name for n in onnx.load_from_string(graph).graph.node if n.op_type == "Gemm"]  # the pooler
    _assert_fp32(q, kept, weights)
    assert [n.op_type for n in q.graph.node].count("MatMulIntegerToFloat") == len(weights) - len(kept)
    assert not [n for n in q.graph.node if n.op_type == "MatMulInteger"]
    plain = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(plain, tokens, lora=True)
    for a, b in zip(plain.run(None, feeds), quant.run(None, feeds)):
        err = float(np.abs(a - b).max()) / float(np.abs(a).max())
        assert 0 < err < 0.1, err  # int8 really ran, and stayed close
    for bad in ({}, {"per_channel": True, "reduce_range": True}, {"per_channel": True, "weight_type": "QUInt8"}):
        with pytest.raises(ValueError, match="per-token"):
            Int8Recipe("bad", per_token=True, **bad)
