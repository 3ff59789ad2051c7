"""Splicing new nodes into an ONNX graph without breaking its topological order.

Contract: ``splice(model, before, replace)`` rewrites ``model.graph.node`` in place, keeping its
order: each list in ``before`` goes just ahead of the first node (as it was) that reads the
tensor named by its key; a node whose name is in ``replace`` is swapped for that list. Then
every initializer no node reads any more is dropped (``drop_unused_initializers``). Used by the int8 rewrites
(``adapters.runtime.onnx.smooth``, ``adapters.runtime.onnx.per_token``).
``drop_nan_guards(graph)`` removes the exporter's NaN guards after each attention softmax
(see there); the text exports (``adapters.runtime.onnx.export``) apply it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx


def splice(model: onnx.ModelProto, before: Mapping[str, Sequence[onnx.NodeProto]],
           replace: Mapping[str, Sequence[onnx.NodeProto]] | None = None) -> None:
    replace = replace or {}
    ordered: list[onnx.NodeProto] = []
    placed: set[str] = set()
    for node in model.graph.node:
        for tensor, nodes in before.items():
            if tensor not in placed and tensor in node.input:
                ordered.extend(nodes)
                placed.add(tensor)
        ordered.extend(replace.get(node.name, [node]))
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    drop_unused_initializers(model)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove every initializer that no node of ``model`` reads."""
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def drop_nan_guards(graph: bytes) -> bytes:
    """The exported attention without its NaN guards: torch's exporter writes each softmax over
    masked scores as ``Where(IsNaN(p), 0, p)``, for a query whose every key is masked (a row
    whose attention mask is all zeros). A tokenised row always attends to its special tokens, so
    the guard never fires; it costs a pass over every ``[B, heads, T, T]`` score tensor (MiniLM,
    32 x 64 tokens: ~20 ms of a ~200 ms int8 forward). Each guard's readers read ``p`` instead."""
    model = onnx.load_from_string(graph)
    isnan = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "IsNaN"}
    alias = {n.output[0]: n.input[2] for n in model.graph.node
             if n.op_type == "Where" and n.input[0] in isnan and n.input[2] == isnan[n.input[0]]}
    if not alias:
        return graph
    outputs = {o.name for o in model.graph.output}
    if outputs & set(alias):
        return graph
    kept = [n for n in model.graph.node if n.output[0] not in alias]
    for node in kept:
        for i, x in enumerate(node.input):
            if x in alias:
                node.input[i] = alias[x]
    read = {i for n in kept for i in n.input}
    kept = [n for n in kept if not (n.op_type == "IsNaN" and n.output[0] not in read)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    drop_unused_initializers(model)  # the guards' constants
    return model.SerializeToString()
