"""SmoothQuant-style smoothing of an fp32 graph before dynamic int8: outlier input channels moved into the weights.

Why: ONNX Runtime's dynamic int8 quantises each matmul's activation with one scale per tensor.
BERT-family activations carry a few outlier channels (MiniLM: one LayerNorm channel ~28 where
the median is ~1.8; one GELU channel ~24 where the median is ~1.3), so every other channel keeps
only a few bits. For a base weight matmul ``x @ W`` this rewrites the graph to
``(x * (1/s)) @ (diag(s) W)`` -- the same product in exact arithmetic -- with
``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)`` per input channel (Xiao et al., SmoothQuant), so
the activation the quantiser sees is flatter and the weight (per-channel quantised) absorbs it.

Contract: ``activation_absmax(model, names, tokens)`` runs the fp32 graph once on ONNX Runtime
(``tokens``: the token inputs by name; every LoRA input is fed zero-width: base rows) and returns
each named tensor's per-channel max |value| (over batch and positions). ``smooth(model, nodes,
absmax, alpha)`` rewrites ``model`` in place: the weight ``MatMul`` nodes named in ``nodes``
that share an input share one ``Mul`` by ``1/s`` (a new node reading that input, so the LoRA
branches still read the unscaled input) and get new weight initializers ``W * s[:, None]``;
inputs without a calibration range, or weights that are not ``[in, out]`` of that width, are
left alone. Returns how many inputs were smoothed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from adapters.runtime.onnx.graph_edit import splice

LORA_PREFIX = "lora_"


def activation_absmax(model: onnx.ModelProto, names: list[str],
                      tokens: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        if i.name.startswith(LORA_PREFIX):  # A: [lead, d_in, cols], B: [lead, rank, d_out]; zero-width: no delta
            d_in, d_out = i.shape[1], i.shape[2]
            shape = (1, d_in, 0) if isinstance(d_in, int) else (1, 0, d_out)
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
        elif i.name in tokens:
            feeds[i.name] = np.ascontiguousarray(tokens[i.name], dtype=np.int64)
        elif i.name == "token_type_ids" and "input_ids" in tokens:  # as serving feeds a tokenizer without them
            feeds[i.name] = np.zeros_like(tokens["input_ids"], dtype=np.int64)
        else:
            raise ValueError(f"no calibration input for the graph's input {i.name!r}")
    outs = session.run(names, feeds)
    return {n: np.abs(o).reshape(-1, o.shape[-1]).max(axis=0) for n, o in zip(names, outs)}


def smooth(model: onnx.ModelProto, nodes: list[str], absmax: Mapping[str, np.ndarray], alpha: float) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.name in wanted and node.op_type == "MatMul" and node.input[1] in inits:
            groups.setdefault(node.input[0], []).append(node)
    muls: dict[str, onnx.NodeProto] = {}
    for x, group in groups.items():
        a = absmax.get(x)
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
        if a is None or any(w.ndim != 2 or w.shape[0] != a.shape[0] for w in weights):
            continue
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = (np.maximum(a, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        inv = f"{x}__smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        muls[x] = onnx.helper.make_node("Mul", [x, inv], [f"{x}__smoothed"], name=f"{x}__smooth")
        for node, w in zip(group, weights):
            name = f"{node.input[1]}__smoothed"
            model.graph.initializer.append(numpy_helper.from_array((w * s[:, None]).astype(np.float32), name))
            node.input[0], node.input[1] = f"{x}__smoothed", name
    if not muls:
        return 0
    # each Mul goes just before the first node that reads its output (the graph stays sorted)
    splice(model, {mul.output[0]: [mul] for mul in muls.values()})
    return len(muls)
