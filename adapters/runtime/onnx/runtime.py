"""Which runtime runs an engine's forward pass: torch, or ONNX Runtime (fp32 or int8).

Contract:

* ``RuntimeChoice(runtime, quantize)`` (``adapters.runtime.onnx.choice``): what is asked for.
* ``apply_runtime(engine, choice, cache_dir)`` swaps the engine's ``serving`` for its task's
  ONNX serving (``PATHS``: ``OnnxTextServing``, ``OnnxImageServing``) when the choice asks for ONNX and the base can have it, and returns a
  ``RuntimeReport`` saying what serves and why. It never raises for a base that cannot: a
  CUDA or non-fp32 base, a task without an ONNX path, or a base whose export fails or
  disagrees with torch is logged with the reason and keeps torch. Nothing fails at request
  time: the swap happens before the engine serves. Resolution, caches, slots, the batcher and
  the heads are the engine's own either way.
* ``onnx_serving(base, torch_serving, precision, cache_dir)`` is the ONNX serving itself
  (raising when it cannot be built): the graph comes from the ``GraphCache`` in ``cache_dir``
  (exported, stamped with the base fingerprint, checked against torch on probe texts with
  three mixed synthetic adapters, then stored; int8 is quantised from the cached fp32 graph).
  Tolerance of that check: ``PARITY_TOLERANCE`` (max abs logit difference).
* The graph built at start is the universal one (a LoRA branch on every adaptable layer). A
  batch whose adapters adapt fewer layers runs on a variant of exactly its target set once one
  is ready (``adapters.runtime.onnx.variants``): ``variants="build"`` (serving) exports,
  checks (probe adapters restricted to the set) and caches each one in the background, keyed
  by its target set; ``"cached"`` (the gate's engine in a short-lived job worker) only reads
  variants the serving process has cached; ``"off"`` keeps the universal graph alone.
* ``build_graphs(base, precision, cache_dir, target_sets)`` fills a graph cache ahead of time
  (the universal graph and the given variants, synchronously, on a copy of ``base``): what a
  deployment step -- or a benchmark that must not time a build -- runs before servers start.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from adapters.pooling import Pooling
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.onnx.choice import QUANTIZE, RUNTIMES, RuntimeChoice
from adapters.runtime.onnx.export import OPSET, ExportError, export_text_graph
from adapters.runtime.onnx.export_image import export_image_graph
from adapters.runtime.onnx.graph_cache import GraphCache, GraphKey, check_graph_base, stamp
from adapters.runtime.onnx.quantize import quantize_int8
from adapters.runtime.onnx.serving import OnnxTextServing, verify
from adapters.runtime.onnx.serving_image import OnnxImageServing
from adapters.runtime.onnx.variants import MAX_VARIANTS
from adapters.runtime.slots import SlotBank
from adapters.synthetic import random_artifact
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION

log = logging.getLogger("tailor.onnx")
__all__ = ["QUANTIZE", "RUNTIMES", "RuntimeChoice", "RuntimeReport", "apply_runtime", "build_graphs", "onnx_serving"]

PARITY_TOLERANCE = 1e-3
VARIANTS = ("build", "cached", "off")
# per task kind: how its base exports, and the serving that runs the graph
PATHS: dict[str, tuple[Callable[[Any], bytes], Callable[..., Any]]] = {
    TEXT_CLASSIFICATION: (export_text_graph, OnnxTextServing),
    IMAGE_CLASSIFICATION: (export_image_graph, OnnxImageServing),
}
# per task kind: three probe adapters unlike each other (rank, targets, labels, pooling)
PROBES: dict[str, list[tuple[int, tuple[str, ...], int, str]]] = {
    TEXT_CLASSIFICATION: [(2, ("query", "value"), 2, "pooler"), (4, ("dense",), 5, "mean"), (3, ("key",), 3, "cls+all_layers")],
    IMAGE_CLASSIFICATION: [(2, ("_expand_conv",), 2, "pooler"), (4, ("_project_conv",), 5, "pooler"),
                           (3, ("_conv_head",), 3, "pooler")],
}


@dataclass(frozen=True)
class RuntimeReport:
    runtime: str  # what serves: "torch" or "onnx"
    precision: str  # "fp32" / "int8" for ONNX; torch: the base's dtype
    reason: str  # why this runtime (a fallback names its cause)
    graph_bytes: int = 0
    built_seconds: float | None = None  # export (+ quantisation) time when built now, None when read from the cache

    @property
    def label(self) -> str:
        return self.runtime if self.runtime == "torch" else f"onnx-{self.precision}"


def onnx_unsupported(base: Any, choice: RuntimeChoice) -> str | None:
    """Why ``base`` cannot serve on ONNX under ``choice`` (None: it may try)."""
    if base.spec.task not in PATHS:
        return f"no ONNX path for {base.spec.task} yet"
    if base.device.type != "cpu":
        return f"the ONNX path runs on CPU; this base is on {base.device}"
    if base.dtype != torch.float32:
        return f"the ONNX path exports fp32 bases; this base is {base.dtype}"
    return None


def apply_runtime(engine: Any, choice: RuntimeChoice, cache_dir: Path | None, *,
                  variants: str = "build") -> RuntimeReport:
    """See the module docstring (``variants``: ``VARIANTS``)."""
    if variants not in VARIANTS:
        raise ValueError(f"unknown variants policy {variants!r}; use one of {', '.join(VARIANTS)}")
    base = engine.base
    torch_precision = str(base.dtype).removeprefix("torch.")
    if choice.runtime == "torch":
        return RuntimeReport("torch", torch_precision, "TAILOR_RUNTIME=torch")
    why = onnx_unsupported(base, choice)
    if why is not None:
        if choice.runtime == "onnx":
            log.warning("%s base %s: %s; serving on torch", base.spec.task, base.spec.name, why)
        return RuntimeReport("torch", torch_precision, why)
    if cache_dir is None:
        raise ValueError("the ONNX runtime needs a graph cache directory")
    try:
        t0 = time.perf_counter()
        serving, built, size = _onnx_serving(base, engine.serving, choice.precision, cache_dir, variants)
        seconds = time.perf_counter() - t0 if built else None
    except Exception as e:  # noqa: BLE001 - any failure here means: this base serves on torch
        log.warning("%s base %s does not serve on ONNX Runtime (%s); serving on torch", base.spec.task,
                    base.spec.name, e)
        return RuntimeReport("torch", torch_precision, f"ONNX export failed: {e}")
    engine.serving = serving
    log.info("%s base %s serves on ONNX Runtime %s (graph %.1f MB, %s)", base.spec.task, base.spec.name,
             choice.precision, size / 1e6, f"exported in {seconds:.1f}s" if built else "from the graph cache")
    return RuntimeReport("onnx", choice.precision, f"TAILOR_RUNTIME={choice.runtime}", graph_bytes=size,
                         built_seconds=seconds)


def onnx_serving(base: Any, torch_serving: Any, precision: str, cache_dir: Path, variants: str = "build") -> Any:
    """The ONNX serving of ``base`` at ``precision`` (raises ``ExportError`` and friends)."""
    return _onnx_serving(base, torch_serving, precision, cache_dir, variants)[0]


def _onnx_serving(base: Any, torch_serving: Any, precision: str, cache_dir: Path,
                  variants: str) -> tuple[Any, bool, int]:
    cache = GraphCache(cache_dir)
    fp = base.spec.fingerprint
    graph, built = cached_graph(base, torch_serving, precision, cache, None)

    def build(targets: frozenset[str]) -> bytes | None:
        if variants == "cached":
            return cache.load(GraphKey.current(fp, precision, OPSET, targets))
        return cached_graph(base, torch_serving, precision, cache, targets)[0]

    serving_class = PATHS[base.spec.task][1]
    serving = serving_class(torch_serving, graph, precision=precision, build=None if variants == "off" else build,
                            max_variants=MAX_VARIANTS)
    check_graph_base(serving.session.get_modelmeta().custom_metadata_map, fp, precision)
    return serving, built, len(graph)


def cached_graph(base: Any, torch_serving: Any, precision: str, cache: GraphCache,
                 targets: frozenset[str] | None) -> tuple[bytes, bool]:
    """(the graph of ``base`` at ``precision`` adapting ``targets`` (None: every adaptable
    layer), whether it was built now): read from ``cache``, else exported, checked against torch
    and stored (int8: quantised from the fp32 graph of the same set, itself cached)."""
    fp = base.spec.fingerprint
    export, serving_class = PATHS[base.spec.task]
    if precision != "fp32":  # a cached int8 graph needs no fp32 graph read
        hit = cache.load(GraphKey.current(fp, precision, OPSET, targets))
        if hit is not None:
            return hit, False

    def build_fp32() -> tuple[bytes, dict]:
        t0 = time.perf_counter()
        graph = stamp(export(base, targets=targets), fp, "fp32", targets)
        seconds = time.perf_counter() - t0
        candidate = serving_class(torch_serving, graph, precision="fp32", build=None)
        diff = verify(torch_serving, candidate, _probe_slots(base), probe_adapters(base, targets))
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"the exported graph differs from torch by {diff:.2e} (tolerance {PARITY_TOLERANCE:g})")
        return graph, {"export_seconds": round(seconds, 3), "parity_max_abs_diff": diff}

    fp32, built = cache.get(GraphKey.current(fp, "fp32", OPSET, targets), build_fp32)
    if precision == "fp32":
        return fp32, built

    def build_int8() -> tuple[bytes, dict]:
        t0 = time.perf_counter()
        q = stamp(quantize_int8(fp32, calibration=calibration_tokens(torch_serving)), fp, "int8", targets)
        return q, {"quantize_seconds": round(time.perf_counter() - t0, 3)}

    graph, built_q = cache.get(GraphKey.current(fp, "int8", OPSET, targets), build_int8)
    return graph, built or built_q


def calibration_tokens(torch_serving: Any) -> dict[str, Any] | None:
    """The task's probe rows, collated, as numpy token inputs: what a smoothing int8 recipe
    measures activation ranges on (None for a task whose batches are not token tensors)."""
    batch = torch_serving.collate(torch_serving.probe_rows())
    if not isinstance(batch, dict):
        return None
    return {k: v.cpu().numpy() for k, v in batch.items()}


def build_graphs(base: Any, precision: str, cache_dir: Path,
                 target_sets: Sequence[frozenset[str]] = ()) -> list[tuple[frozenset[str] | None, bool]]:
    """(target set, whether it was built now) for the universal graph and each of ``target_sets``."""
    from adapters.tasks import get_task

    copied = dataclasses.replace(base, model=copy.deepcopy(base.model))
    torch_serving = get_task(copied.spec.task).serving(copied)
    cache = GraphCache(cache_dir)
    return [(t, cached_graph(copied, torch_serving, precision, cache, t)[1]) for t in (None, *target_sets)]


def _probe_slots(base: Any) -> SlotBank:
    """A slot bank of its own for the parity check (the engine's slots hold real tenants)."""
    return SlotBank(base.spec.linear_shapes, base.spec.head_in_features, 8, base.device, base.dtype)


def probe_adapters(base: Any, within: frozenset[str] | None = None) -> list[LoadedAdapter]:
    """Three synthetic adapters unlike each other (``PROBES``; text: ranks 2/4/3, targets
    query+value / every dense layer (the pooler's too) / key, 2/5/3 labels, the pooler / mean /
    cls-over-all-layers pooling; images: the expand / project / head 1x1 convs). ``within``: a variant's target
    set; each probe keeps the layers of it that it targets, or targets all of it when none."""
    spec = base.spec
    out = []
    for i, (r, names, n_labels, pooling) in enumerate(PROBES[spec.task]):
        paths = [p for t in names for p in spec.match_target(t)]
        if within is not None:
            paths = [p for p in paths if p in within] or sorted(within)
        targets = tuple(paths) or (next(iter(spec.linear_shapes)),)
        art = random_artifact(spec, r=r, targets=targets, n_labels=n_labels, seed=100 + i)
        if Pooling.parse(pooling).uses_tokens and not spec.pools_tokens:
            pooling = "pooler"
        art = dataclasses.replace(art, manifest=dataclasses.replace(art.manifest, pooling=Pooling.parse(pooling)))
        key = VersionKey(tenant="probe", adapter=f"probe{i}", version=1, sha256="0" * 64)
        out.append(LoadedAdapter.from_artifact(key, art, base.dtype))
    return out
