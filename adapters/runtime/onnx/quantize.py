"""Dynamic int8 quantisation of an exported graph: the base's weight matmuls, by a named recipe.

Contract: ``quantize_int8(graph, recipe=DEFAULT_RECIPE)`` returns the bytes of a graph with the
same inputs and outputs in which the frozen base's linear layers -- a ``MatMul`` whose second
input is a weight (an initializer) -- run as ONNX Runtime's dynamic ``MatMulInteger`` (int8
weights, activations quantised to uint8 per tensor on each call; ORT fuses the pattern into
``DynamicQuantizeMatMul`` at load; a per-token recipe writes ``MatMulIntegerToFloat`` nodes
itself, see below), except those the recipe keeps fp32. Every other ``MatMul``
-- the LoRA down/up projections, whose weights are graph inputs, and attention's activation
products -- stays fp32, listed by name in ``nodes_to_exclude`` (ORT's quantiser would otherwise
quantise dynamic operands too). BERT's pooler exports as a ``Gemm``, which ORT quantises the
same way. The heads are not in the graph (torch, fp32). ``weight_matmuls(model)`` tells the two
kinds of ``MatMul`` apart; ``kept_fp32(model, recipe)`` names the weight layers (``MatMul`` or
``Gemm``) a recipe leaves fp32.

``Int8Recipe``: ``per_channel`` (one weight scale per output column instead of one per
matrix), ``reduce_range`` (7-bit weights, for CPUs without VNNI), ``weight_type``
(``QInt8``/``QUInt8``), ``keep_fp32`` (regular expressions over node names) and
``keep_last_layers`` (the last N encoder layers, by the ``layer.N`` in the names),
``smooth_alpha`` (> 0: SmoothQuant-style smoothing, ``adapters.runtime.onnx.smooth``, with
activation ranges measured on the ``calibration`` tokens ``quantize_int8`` is given) and
``per_token`` (activations quantised with one scale per token instead of one per tensor:
``adapters.runtime.onnx.per_token`` rewrites the weight matmuls itself, as
``MatMulIntegerToFloat`` nodes, and ORT's quantiser is not used; ``Gemm`` layers stay fp32). A recipe's
``key`` spells every field: the graph cache keys int8 graphs by it, so a graph quantised by
another recipe (or an older default) is never reused. ``RECIPES`` holds the named ones measured
by ``bench.onnx_agreement --int8-recipes``; ``DEFAULT_RECIPE`` is what serving uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from adapters.runtime.onnx.per_token import quantize_per_token
from adapters.runtime.onnx.smooth import activation_absmax, smooth

_LAYER = re.compile(r"layer\.(\d+)/")
FFN_OUT = r"/layer\.\d+/output/dense/"  # BERT's FFN output (intermediate -> hidden): GELU outliers in its input


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    per_channel: bool = False
    reduce_range: bool = False
    weight_type: str = "QInt8"
    keep_fp32: tuple[str, ...] = ()
    keep_last_layers: int = 0
    smooth_alpha: float = 0.0  # > 0: SmoothQuant-style smoothing (adapters.runtime.onnx.smooth) at this alpha
    per_token: bool = False  # one activation scale per token (adapters.runtime.onnx.per_token), not per tensor

    def __post_init__(self) -> None:
        if self.weight_type not in ("QInt8", "QUInt8"):
            raise ValueError(f"weight_type must be QInt8 or QUInt8, not {self.weight_type!r}")
        if not 0.0 <= self.smooth_alpha < 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1), not {self.smooth_alpha}")
        if self.per_token and (not self.per_channel or self.reduce_range or self.weight_type != "QInt8"):
            raise ValueError("a per-token recipe quantises weights per column, symmetric, 8 bits: "
                             "per_channel=True, reduce_range=False, weight_type='QInt8'")
        for pattern in self.keep_fp32:
            re.compile(pattern)

    @property
    def key(self) -> str:
        """The recipe as the graph cache keys it: its name and a digest of every field."""
        fields = json.dumps(asdict(self), sort_keys=True)
        return f"{self.name}:{hashlib.sha256(fields.encode()).hexdigest()[:12]}"


RECIPES: dict[str, Int8Recipe] = {r.name: r for r in (
    Int8Recipe("per-tensor"),  # the first recipe (issue 15, sessions 5-7)
    Int8Recipe("per-channel", per_channel=True),
    Int8Recipe("per-channel-rr", per_channel=True, reduce_range=True),
    Int8Recipe("per-channel-keep-ffn-out", per_channel=True, keep_fp32=(FFN_OUT,)),
    Int8Recipe("per-channel-keep-last", per_channel=True, keep_last_layers=1),
    Int8Recipe("smooth", per_channel=True, smooth_alpha=0.5),
    Int8Recipe("smooth-rr", per_channel=True, reduce_range=True, smooth_alpha=0.5),
    Int8Recipe("smooth-keep-ffn-out", per_channel=True, smooth_alpha=0.5, keep_fp32=(FFN_OUT,)),
    Int8Recipe("per-token-smooth", per_channel=True, per_token=True, smooth_alpha=0.5),
    Int8Recipe("per-token-smooth-keep-ffn-out", per_channel=True, per_token=True, smooth_alpha=0.5, keep_fp32=(FFN_OUT,)),
    Int8Recipe("per-token-keep-ffn-out", per_channel=True, per_token=True, keep_fp32=(FFN_OUT,)),
)}
# measured (bench/results/engine-onnx-int8-per-token-*-cpu.json, engine-onnx-int8-recipes-*-cpu.json):
# the only recipe at >= 99.5% agreement with torch fp32 on every set (IMDB's whole 1,000-row split:
# 99.6%, where smooth-keep-ffn-out, the default before it, agreed on 99.3%); 0.90x that recipe's speed
DEFAULT_RECIPE = RECIPES["per-token-smooth-keep-ffn-out"]


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


def kept_fp32(model: onnx.ModelProto, recipe: Int8Recipe) -> list[str]:
    """The weight layers ``recipe`` leaves fp32 (nodes named as in ``model``): a per-token recipe
    also leaves every ``Gemm`` (BERT's pooler: one row per sequence, no tokens to scale)."""
    gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
    weights = weight_matmuls(model)[0] + sorted(gemms)
    layers = [int(m.group(1)) for w in weights if (m := _LAYER.search(w))]
    first_kept = max(layers) - recipe.keep_last_layers + 1 if layers and recipe.keep_last_layers else None
    kept = []
    for name in weights:
        m = _LAYER.search(name)
        if any(re.search(p, name) for p in recipe.keep_fp32) or (recipe.per_token and name in gemms) or (
                first_kept is not None and m is not None and int(m.group(1)) >= first_kept):
            kept.append(name)
    return kept


def quantize_int8(graph: bytes, recipe: Int8Recipe = DEFAULT_RECIPE,
                  calibration: Mapping[str, np.ndarray] | None = None) -> bytes:
    """``calibration``: token inputs by name (a few texts' ``input_ids``, ``attention_mask``...)
    that a smoothing recipe measures activation ranges on; ignored by the others."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load_from_string(graph)
    for i, node in enumerate(model.graph.node):  # the quantiser selects nodes by name
        if not node.name:
            node.name = f"node_{i}"
    weights, others = weight_matmuls(model)
    keep = kept_fp32(model, recipe)
    kept = set(keep)
    quantised = [w for w in weights if w not in kept]
    if not quantised:
        raise ValueError("the graph has no weight matmul to quantise")
    if recipe.smooth_alpha:
        if calibration is None:
            raise ValueError(f"int8 recipe {recipe.name!r} smooths activations: it needs calibration tokens")
        smooth(model, quantised, _input_absmax(model, quantised, calibration), recipe.smooth_alpha)
    if recipe.per_token:
        quantize_per_token(model, quantised)
        return model.SerializeToString()
    quiet = _NoPreprocessAdvice()
    logging.getLogger().addFilter(quiet)  # ORT advises shape pre-processing on the root logger each time
    try:
        with tempfile.TemporaryDirectory(prefix="tailor-int8-") as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], nodes_to_exclude=others + keep,
                             weight_type=getattr(QuantType, recipe.weight_type), per_channel=recipe.per_channel,
                             reduce_range=recipe.reduce_range)
            result = onnx.load(str(out))
    finally:
        logging.getLogger().removeFilter(quiet)
    del result.metadata_props[:]
    result.metadata_props.extend(model.metadata_props)
    return result.SerializeToString()


def _input_absmax(model: onnx.ModelProto, names: list[str], calibration: Mapping[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    nodes = {n.name: n for n in model.graph.node}
    return activation_absmax(model, sorted({nodes[w].input[0] for w in names}), calibration)


class _NoPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()
