"""The graph cache and the runtime's fallbacks: a graph is built once per base, reused across
restarts, refused (and rebuilt) when its checksum, sidecar or own metadata names another base;
a base that cannot serve on ONNX logs why and keeps torch."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from adapters.base import _finish, bundled_model_path, tiny_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.onnx.graph_cache import (
    FINGERPRINT_PROP, GraphCache, GraphKey, GraphMismatchError, check_graph_base, graph_metadata, stamp,
)
from adapters.runtime.onnx.runtime import RuntimeChoice, apply_runtime
from adapters.runtime.onnx.serving import OnnxTextServing
from adapters.store import LocalStore

CONFIG = EngineConfig(max_resident=8, device_slots=9, max_batch_size=8, tune_allocator=False)


def _tiny(seed):
    return tiny_base(seed=seed, num_layers=1)


def _engine(tmp_path, base):
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    return Engine(base, catalog, CONFIG)


def _graph_files(root):
    return sorted(root.glob("*.onnx")), sorted(root.glob("*.json"))


def test_built_once_then_reused_after_a_restart(tmp_path):
    graphs = tmp_path / "graphs"
    first = apply_runtime(_engine(tmp_path, _tiny(5)), RuntimeChoice("onnx"), graphs)
    assert first.runtime == "onnx" and first.built_seconds is not None and first.graph_bytes > 0
    (onnx_file,), (meta_file,) = _graph_files(graphs)
    meta = json.loads(meta_file.read_text())
    assert meta["key"]["fingerprint"] == _tiny(5).spec.fingerprint and meta["parity_max_abs_diff"] <= 1e-4
    stamp_before = onnx_file.stat().st_mtime_ns
    again = _engine(tmp_path, _tiny(5))  # a restart: a fresh process state over the same directory
    second = apply_runtime(again, RuntimeChoice("auto"), graphs)
    assert second.runtime == "onnx" and second.built_seconds is None
    assert onnx_file.stat().st_mtime_ns == stamp_before
    assert isinstance(again.serving, OnnxTextServing)


def test_corrupt_graph_is_refused_and_rebuilt(tmp_path, caplog):
    graphs = tmp_path / "graphs"
    apply_runtime(_engine(tmp_path, _tiny(5)), RuntimeChoice("onnx"), graphs)
    (onnx_file,), _ = _graph_files(graphs)
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        report = apply_runtime(_engine(tmp_path, _tiny(5)), RuntimeChoice("onnx"), graphs)
    assert "fails its checksum" in caplog.text
    assert report.runtime == "onnx" and report.built_seconds is not None
    key = GraphKey.current(_tiny(5).spec.fingerprint, "fp32", 17)
    assert GraphCache(graphs).load(key) is not None  # the rebuilt file passes


def test_graph_of_another_base_is_refused(tmp_path, caplog):
    """Another base's graph copied under this base's key, its sidecar made consistent: the
    graph's own metadata names the other base, so it is refused and rebuilt."""
    graphs = tmp_path / "graphs"
    other_fp = _tiny(6).spec.fingerprint
    apply_runtime(_engine(tmp_path, _tiny(6)), RuntimeChoice("onnx"), graphs)
    other_key = GraphKey.current(other_fp, "fp32", 17)
    other_graph = GraphCache(graphs).load(other_key)
    assert other_graph is not None
    mine = GraphKey.current(_tiny(5).spec.fingerprint, "fp32", 17)
    GraphCache(graphs).store(mine, other_graph)  # checksum and sidecar key both right; the graph is not
    with caplog.at_level(logging.WARNING):
        assert GraphCache(graphs).load(mine) is None
    assert "exported from base" in caplog.text
    with pytest.raises(GraphMismatchError, match="exported from base"):
        check_graph_base(graph_metadata(other_graph), mine.fingerprint, "fp32")
    # a sidecar naming another key is refused before the bytes are trusted
    _, meta_path = GraphCache(graphs).paths(mine)
    meta = json.loads(meta_path.read_text())
    meta["key"]["fingerprint"] = other_fp
    meta_path.write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert GraphCache(graphs).load(mine) is None
    assert "was built for base" in caplog.text
    report = apply_runtime(_engine(tmp_path, _tiny(5)), RuntimeChoice("onnx"), graphs)
    assert report.runtime == "onnx" and report.built_seconds is not None
    assert graph_metadata(GraphCache(graphs).load(mine))[FINGERPRINT_PROP] == mine.fingerprint


def test_stamp_records_base_and_precision():
    from adapters.runtime.onnx.export import export_text_graph
    from adapters.tasks import get_task

    base = _tiny(5)
    get_task(base.spec.task).serving(base)
    meta = graph_metadata(stamp(export_text_graph(base), base.spec.fingerprint, "int8"))
    check_graph_base(meta, base.spec.fingerprint, "int8")
    with pytest.raises(GraphMismatchError, match="is int8, not fp32"):
        check_graph_base(meta, base.spec.fingerprint, "fp32")
    with pytest.raises(ValueError, match="not an ONNX model"):
        graph_metadata(b"definitely not protobuf \xff\xff")


def _tiny_distilbert():
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(cfg)
    tok = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    return _finish(model, tok, None, "cpu", None, 32, name="tiny-distilbert")


def test_a_base_that_does_not_export_serves_on_torch(tmp_path, caplog):
    """DistilBERT's head reads no pooled output of its backbone: the export refuses it, the
    reason is logged, and the engine keeps serving (and answering) on torch."""
    engine = _engine(tmp_path, _tiny_distilbert())
    torch_serving = engine.serving
    with caplog.at_level(logging.WARNING):
        report = apply_runtime(engine, RuntimeChoice("onnx"), tmp_path / "graphs")
    assert report.runtime == "torch" and "no pooled output" in report.reason
    assert "does not serve on ONNX Runtime" in caplog.text and "serving on torch" in caplog.text
    assert engine.serving is torch_serving
    out = engine.forward(engine.serving.collate(["still served", "on torch"]), [None, None])
    assert out.features.shape == (2, 32)


def test_choices_that_keep_torch(tmp_path, caplog):
    engine = _engine(tmp_path, tiny_base(seed=5, num_layers=1, dtype="bfloat16"))
    with caplog.at_level(logging.WARNING):
        assert apply_runtime(engine, RuntimeChoice("onnx"), tmp_path / "g").runtime == "torch"
    assert "exports fp32 bases" in caplog.text
    plain = _engine(tmp_path, _tiny(5))
    assert apply_runtime(plain, RuntimeChoice("torch", "int8"), tmp_path / "g").runtime == "torch"
    assert not (tmp_path / "g").exists()  # torch asked: nothing exported
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        RuntimeChoice("tensorrt")
    with pytest.raises(ValueError, match="unknown quantisation 'int4'"):
        RuntimeChoice("onnx", "int4")
