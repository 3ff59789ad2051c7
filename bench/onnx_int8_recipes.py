"""int8 recipes for ``bench.onnx_agreement --int8-recipes``: the named ones and per-layer probes.

Contract: ``recipe_named(name)`` is ``adapters.runtime.onnx.quantize.RECIPES[name]`` or one of
the sensitivity probes here (per-channel int8 with one group of weight matmuls kept fp32:
``pc-keep-qkv``, ``pc-keep-attn-out``, ``pc-keep-ffn-in``, ``pc-keep-ffn-out``,
``pc-keep-layerN``), so one run can say which layers cost agreement. ``int8_serving(base,
torch_serving, graph_dir, recipe, targets)`` quantises the cached fp32 graph of that target set
(exported into ``graph_dir`` when absent) by ``recipe`` and returns an ``OnnxTextServing`` over
it (no variants) and the names of the weight matmuls the recipe kept fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from adapters.runtime.onnx.graph_cache import GraphCache, stamp
from adapters.runtime.onnx.quantize import FFN_OUT, RECIPES, Int8Recipe, kept_fp32, quantize_int8
from adapters.runtime.onnx.runtime import cached_graph, calibration_tokens
from adapters.runtime.onnx.serving import OnnxTextServing

GROUPS = {"qkv": r"/attention/self/(query|key|value)/", "attn-out": r"/attention/output/dense/",
          "ffn-in": r"/intermediate/dense/", "ffn-out": FFN_OUT, "pooler": r"/pooler/"}


def recipe_named(name: str) -> Int8Recipe:
    if name in RECIPES:
        return RECIPES[name]
    if name.startswith("pc-keep-layer") and name[len("pc-keep-layer"):].isdigit():
        return Int8Recipe(name, per_channel=True, keep_fp32=(rf"/layer\.{int(name[len('pc-keep-layer'):])}/",))
    group = name.removeprefix("pc-keep-")
    if name.startswith("pc-keep-") and group in GROUPS:
        return Int8Recipe(name, per_channel=True, keep_fp32=(GROUPS[group],))
    raise ValueError(f"unknown int8 recipe {name!r}: one of {', '.join(RECIPES)}, "
                     f"pc-keep-{{{','.join(GROUPS)}}} or pc-keep-layerN")


def recipe_names(value: str) -> tuple[str, ...]:
    """A ``--recipes``-style comma list, each name checked by ``recipe_named`` (an unknown one is a
    ValueError before anything is built or trained)."""
    names = tuple(r for r in value.split(",") if r)
    for r in names:
        recipe_named(r)
    return names


def int8_serving(base: Any, torch_serving: Any, graph_dir: Path, recipe: Int8Recipe,
                 targets: frozenset[str] | None = None) -> tuple[OnnxTextServing, list[str]]:
    fp32, _ = cached_graph(base, torch_serving, "fp32", GraphCache(graph_dir), targets)
    graph = stamp(quantize_int8(fp32, recipe, calibration_tokens(torch_serving)), base.spec.fingerprint, "int8", targets)
    serving = OnnxTextServing(torch_serving, graph, precision="int8", build=None)
    return serving, kept_fp32(onnx.load_from_string(fp32), recipe)
