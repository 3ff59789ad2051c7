"""Per-token int8 activations: a base weight matmul rewritten to int8 with one activation scale per token.

Why: ONNX Runtime's dynamic int8 (``DynamicQuantizeMatMul``) quantises a matmul's input with one
scale for the whole batch tensor, so one token with large activations (BERT's [CLS]/[SEP] carry
a few) or one long row sets the step for every other token of every other row: a row's logits
then depend on its batch-mates. Here each token (each row of the flattened input) gets its own
symmetric int8 scale, as in SmoothQuant's and LLM.int8's "per-token" activations, and the
weight one symmetric int8 scale per output column.

Contract: ``quantize_per_token(model, nodes)`` rewrites ``model`` in place. Each ``MatMul`` named
in ``nodes`` whose second input is an initializer ``W [K, N]`` becomes, with ``x`` flattened to
rows ``[M, K]`` (one per token)::

    s  = max(max_k |x[m, k]|, eps) / 127                       one scale per row, [M]
    q  = QuantizeLinear(x, s, 128, axis=0)                     uint8 around 128 (|x / s| <= 127)
    y  = MatMulIntegerToFloat(q, Wq, 1, w_scale, 128) * s[:, None], reshaped back to [..., N]
         Wq = round(W / w_scale) (int8), w_scale = max_k |W[k, n]| / 127 per output column

(``q`` and ``s`` computed once per input, shared by the nodes that read it: query/key/value;
uint8 around 128 rather than int8 because ORT's u8 x s8 kernels are the fast ones: s8 x s8 ran
~5x slower here). The output keeps its name, so every consumer (the bias ``Add``, the LoRA
branch's sum) reads the same tensor; LoRA branches read ``x`` unquantised. Other nodes are left
alone; the model gains the ``com.microsoft`` opset. Returns how many matmuls were rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adapters.runtime.onnx.graph_edit import splice

EPS = 1e-8
QMAX = 127.0
ZERO_POINT = 128  # activations as uint8 around 128 (see the module docstring)


def quantize_per_token(model: onnx.ModelProto, nodes: list[str]) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    targets = [n for n in model.graph.node
               if n.name in wanted and n.op_type == "MatMul" and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2]
    if not targets:
        return 0
    consts = [numpy_helper.from_array(np.array(EPS, np.float32), "per_token__eps"),
              numpy_helper.from_array(np.array(1.0 / QMAX, np.float32), "per_token__inv_qmax"),
              numpy_helper.from_array(np.array(0.0, np.float32), "per_token__zero"),
              numpy_helper.from_array(np.array(ZERO_POINT, np.float32), "per_token__zp_f"),
              numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "per_token__zp"),
              numpy_helper.from_array(np.array(1.0, np.float32), "per_token__one"),
              numpy_helper.from_array(np.array([-1], np.int64), "per_token__last"),
              numpy_helper.from_array(np.array([0], np.int64), "per_token__first"),
              numpy_helper.from_array(np.array([1], np.int64), "per_token__axis1")]
    chains: dict[str, list[onnx.NodeProto]] = {}  # input -> the nodes quantising it (before its first reader)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # node name -> the nodes replacing it
    for node in targets:
        x, w_name, y = node.input[0], node.input[1], node.output[0]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if x not in chains:  # x [..., K] -> rows [M, K], a scale per row, uint8 around ZERO_POINT
            consts.append(numpy_helper.from_array(np.array([-1, w.shape[0]], np.int64), f"{x}__pt_2d_shape"))
            chains[x] = [
                helper.make_node("Reshape", [x, f"{x}__pt_2d_shape"], [f"{x}__pt_2d"], name=f"{x}__pt_2d"),
                helper.make_node("ReduceMax", [f"{x}__pt_2d"], [f"{x}__pt_hi"], name=f"{x}__pt_hi", axes=[1], keepdims=0),
                helper.make_node("ReduceMin", [f"{x}__pt_2d"], [f"{x}__pt_lo"], name=f"{x}__pt_lo", axes=[1], keepdims=0),
                helper.make_node("Neg", [f"{x}__pt_lo"], [f"{x}__pt_nlo"], name=f"{x}__pt_nlo"),
                helper.make_node("Max", [f"{x}__pt_hi", f"{x}__pt_nlo", "per_token__eps"], [f"{x}__pt_max"],
                                 name=f"{x}__pt_max"),
                helper.make_node("Mul", [f"{x}__pt_max", "per_token__inv_qmax"], [f"{x}__pt_s"], name=f"{x}__pt_s"),
                helper.make_node("Mul", [f"{x}__pt_s", "per_token__zero"], [f"{x}__pt_z0"], name=f"{x}__pt_z0"),
                helper.make_node("Add", [f"{x}__pt_z0", "per_token__zp_f"], [f"{x}__pt_zf"], name=f"{x}__pt_zf"),
                helper.make_node("Cast", [f"{x}__pt_zf"], [f"{x}__pt_z"], name=f"{x}__pt_z", to=TensorProto.UINT8),
                helper.make_node("QuantizeLinear", [f"{x}__pt_2d", f"{x}__pt_s", f"{x}__pt_z"], [f"{x}__pt_q"],
                                 name=f"{x}__pt_q", axis=0),
                helper.make_node("Unsqueeze", [f"{x}__pt_s", "per_token__axis1"], [f"{x}__pt_s2"], name=f"{x}__pt_s2"),
                helper.make_node("Shape", [x], [f"{x}__pt_shape"], name=f"{x}__pt_shape"),
                helper.make_node("Slice", [f"{x}__pt_shape", "per_token__first", "per_token__last"], [f"{x}__pt_lead"],
                                 name=f"{x}__pt_lead"),
            ]
        w_scale = np.maximum(np.abs(w).max(axis=0), EPS) / QMAX
        wq = np.clip(np.round(w / w_scale), -QMAX, QMAX).astype(np.int8)
        n = node.name
        consts += [numpy_helper.from_array(wq, f"{w_name}__pt_q"),
                   numpy_helper.from_array(w_scale.astype(np.float32), f"{w_name}__pt_scale"),
                   numpy_helper.from_array(np.array([w.shape[1]], np.int64), f"{n}__pt_width")]
        replaced[n] = [  # (q - ZERO_POINT) @ wq * w_scale, fused by ORT; then * s per row, back to [..., N]
            helper.make_node("MatMulIntegerToFloat", [f"{x}__pt_q", f"{w_name}__pt_q", "per_token__one",
                                                      f"{w_name}__pt_scale", "per_token__zp"],
                             [f"{n}__pt_f"], name=f"{n}__pt_mm", domain="com.microsoft"),
            helper.make_node("Mul", [f"{n}__pt_f", f"{x}__pt_s2"], [f"{n}__pt_xs"], name=f"{n}__pt_xs"),
            helper.make_node("Concat", [f"{x}__pt_lead", f"{n}__pt_width"], [f"{n}__pt_shape"], name=f"{n}__pt_shape",
                             axis=0),
            helper.make_node("Reshape", [f"{n}__pt_xs", f"{n}__pt_shape"], [y], name=f"{n}__pt_out"),
        ]
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.graph.initializer.extend(consts)
    splice(model, chains, replaced)  # each chain just before its input's first reader
    return len(targets)
