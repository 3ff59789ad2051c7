"""Dynamic int8 quantisation of an exported graph: the base's weight matmuls only.

Contract: ``quantize_int8(graph)`` returns the bytes of a graph with the same inputs and
outputs in which every linear layer of the frozen base -- a ``MatMul`` whose second input is a
weight (an initializer), or the ``Gemm`` a 2-D linear exports as (BERT's pooler) -- runs as ONNX
Runtime's dynamic ``MatMulInteger`` (int8 weights, activations quantised per call). Every other ``MatMul`` -- the LoRA down/up projections, whose
weights are graph inputs, and attention's activation products -- stays fp32, listed by name in
``nodes_to_exclude`` (ORT's quantiser would otherwise quantise dynamic operands too). The heads
are not in the graph (torch, fp32). ``weight_matmuls(model)`` tells the two kinds apart.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx


def weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(names of MatMuls with an initializer operand, names of the others)."""
    inits = {i.name for i in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    weights, others = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        (weights if node.input[1] in inits or node.input[1] in consts else others).append(node.name)
    return weights, others


def quantize_int8(graph: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load_from_string(graph)
    for i, node in enumerate(model.graph.node):  # the quantiser selects nodes by name
        if not node.name:
            node.name = f"node_{i}"
    weights, others = weight_matmuls(model)
    if not weights:
        raise ValueError("the graph has no weight matmul to quantise")
    quiet = _NoPreprocessAdvice()
    logging.getLogger().addFilter(quiet)  # ORT advises shape pre-processing on the root logger each time
    try:
        with tempfile.TemporaryDirectory(prefix="tailor-int8-") as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], nodes_to_exclude=others,
                             weight_type=QuantType.QInt8, per_channel=False)
            result = onnx.load(str(out))
    finally:
        logging.getLogger().removeFilter(quiet)
    del result.metadata_props[:]
    result.metadata_props.extend(model.metadata_props)
    return result.SerializeToString()


class _NoPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()
