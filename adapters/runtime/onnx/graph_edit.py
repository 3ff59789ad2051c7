"""Splicing new nodes into an ONNX graph without breaking its topological order.

Contract: ``splice(model, before, replace)`` rewrites ``model.graph.node`` in place, keeping its
order: each list in ``before`` goes just ahead of the first node (as it was) that reads the
tensor named by its key; a node whose name is in ``replace`` is swapped for that list. Then
every initializer no node reads any more is dropped. Used by the int8 rewrites
(``adapters.runtime.onnx.smooth``, ``adapters.runtime.onnx.per_token``).
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
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
