"""Post-export rewrites: the exporter's NaN guards after attention softmaxes are dropped (the
graph reads the same on any row with an attended token), and Tailor's text exports carry none."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from adapters.base import tiny_base
from adapters.runtime.onnx.export import export_text_graph
from adapters.runtime.onnx.graph_edit import drop_nan_guards
from adapters.tasks import get_task


def _guarded() -> bytes:
    """scores [B, T, T] + mask -> Softmax -> Where(IsNaN(p), 0, p) -> MatMul with v, as torch exports it."""
    nodes = [
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
        helper.make_node("Where", ["nan", "zero", "p"], ["guarded"], name="where"),
        helper.make_node("MatMul", ["guarded", "v"], ["out"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", "t"]) for n in ("scores", "mask")]
        + [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "t", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "t", 4])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _run(graph: bytes, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_dropping_the_guards_is_exact_when_a_key_is_attended():
    guarded = _guarded()
    plain = drop_nan_guards(guarded)
    model = onnx.load_from_string(plain)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Add", "Softmax", "MatMul"]
    assert not model.graph.initializer  # the guard's zero went with it
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((3, 5, 5)) < 0.5, -np.inf, 0.0).astype(np.float32)
    mask[..., 0] = 0.0  # every query attends to its first key (a tokenised row's [CLS])
    feeds = {"scores": rng.standard_normal((3, 5, 5)).astype(np.float32), "mask": mask,
             "v": rng.standard_normal((3, 5, 4)).astype(np.float32)}
    assert np.array_equal(_run(guarded, feeds), _run(plain, feeds))
    # the case the guard was for (every key masked) is the only one that differs
    feeds["mask"] = np.full((3, 5, 5), -np.inf, np.float32)
    assert np.isnan(_run(plain, feeds)).all() and not np.isnan(_run(guarded, feeds)).any()
    assert drop_nan_guards(plain) == plain  # nothing left to drop


def test_text_exports_carry_no_guards():
    base = tiny_base(seed=3)
    get_task(base.spec.task).serving(base)  # prepares the base as serving does
    ops = [n.op_type for n in onnx.load_from_string(export_text_graph(base)).graph.node]
    assert "Softmax" in ops and "IsNaN" not in ops
