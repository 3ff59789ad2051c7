"""Graph variants per target set: one ONNX session per set of layers a batch's adapters adapt.

The universal graph has a LoRA branch on every adaptable layer; a batch whose adapters target
only query/value still pays, on every other layer, a zero-width matmul, a zero-filled delta
and an add. A *variant* is the same base exported with branches on exactly the batch's layers
(every other layer plain), so such a batch runs at the cost of its own LoRA work only.

Contract:

* ``GraphVariants(spec, graph, threads=, build=, max_variants=)`` starts from one graph (the
  universal one, normally) whose target set its metadata names (``graph_cache.TARGETS_PROP``).
* ``pick(needed)`` -- ``needed``: the modules a ``BatchPlan`` adapts -- returns the ``Variant``
  to run: the graph of exactly that set when it is ready, else the smallest ready graph that
  covers the set (the universal graph covers every set). It never waits for a build.
* The first time a non-empty set has no exact graph, ``build(needed)`` is queued on one
  background thread (one build at a time, at most ``max_variants`` sets per serving, first
  asked first built); ``build`` returns the variant's bytes (exported, checked against torch
  and stored in the graph cache by the caller, or read back from it) or None when it will not
  build (a gate engine that only reads the cache). A failed build is logged once and not
  retried; the covering graph keeps serving. The empty set (base rows only) is never built.
* ``settle(timeout)`` waits for the queued builds (tests, benchmarks); ``ready()`` lists the
  sets with a graph. Thread-safe: ``pick`` holds a lock for a dict lookup. At interpreter exit
  the build under way finishes (a process killed mid-export aborts in C++) and queued ones are
  dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass

import onnxruntime as ort
import torch

from adapters.fingerprint import BaseSpec
from adapters.runtime.onnx.graph_cache import TARGETS_PROP, parse_targets
from adapters.runtime.onnx.layout import GraphLayout

log = logging.getLogger("tailor.onnx")

MAX_VARIANTS = 3  # target-set graphs per serving beside the first (each holds a copy of the base weights)


@dataclass(frozen=True)
class Variant:
    layout: GraphLayout
    session: ort.InferenceSession
    inputs: tuple[str, ...]  # the graph's inputs before its LoRA inputs (tokens, pixels)
    nbytes: int
    built_seconds: float | None = None  # how long ``build`` took for a variant (None: the first graph)

    @property
    def width(self) -> int:
        """How many layers carry a LoRA branch."""
        return len(self.layout.modules)


def make_session(graph: bytes, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between ops: the serving process shares its cores with torch, the event
    # loop and other workers, and a spinning pool stalls them (measured: 2 ms calls became 50 ms)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])


def open_variant(spec: BaseSpec, graph: bytes, threads: int | None = None,
                 built_seconds: float | None = None) -> Variant:
    """A session over ``graph`` and the layout its metadata names; a graph whose LoRA inputs are
    not that layout's is refused (ValueError)."""
    session = make_session(graph, threads)
    targets = parse_targets(session.get_modelmeta().custom_metadata_map.get(TARGETS_PROP))
    layout = GraphLayout.of(spec, targets)
    names = [i.name for i in session.get_inputs()]
    leading = tuple(n for n in names if not n.startswith("lora_"))
    if names[len(leading):] != layout.input_names:
        raise ValueError("the graph's LoRA inputs are not this base's layout")
    return Variant(layout=layout, session=session, inputs=leading, nbytes=len(graph), built_seconds=built_seconds)


class GraphVariants:
    def __init__(self, spec: BaseSpec, graph: bytes, *, threads: int | None = None,
                 build: Callable[[frozenset[str]], bytes | None] | None = None,
                 max_variants: int = MAX_VARIANTS) -> None:
        self.spec = spec
        self.threads = threads or torch.get_num_threads()
        self.first = open_variant(spec, graph, self.threads)
        self.build = build
        self.max_variants = max_variants
        self._ready: dict[frozenset[str], Variant] = {self.first.layout.modules: self.first}
        self._asked: dict[frozenset[str], Future] = {}
        self._queue: list[frozenset[str]] = []
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        _LIVE.add(self)

    def pick(self, needed: frozenset[str]) -> Variant:
        with self._lock:
            exact = self._ready.get(needed)
            if exact is not None:
                return exact
            if needed and self.build is not None and needed not in self._asked \
                    and len(self._asked) < self.max_variants:
                self._asked[needed] = Future()
                self._queue.append(needed)
                if self._worker is None:
                    # not a daemon: a process exiting mid-export aborts in C++; at exit the build
                    # under way finishes and the queued ones are dropped (``_drop_queue``)
                    self._worker = threading.Thread(target=self._work, name="tailor-onnx-variants")
                    self._worker.start()
            covering = [v for v in self._ready.values() if v.layout.covers(needed)]
        if not covering:
            raise ValueError(f"no ONNX graph of this serving adapts {sorted(needed)[:3]}...")
        return min(covering, key=lambda v: v.width)

    def ready(self) -> list[Variant]:
        with self._lock:
            return list(self._ready.values())

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for every queued build; True when none is left running."""
        with self._lock:
            futures = list(self._asked.values())
        done, pending = wait(futures, timeout=timeout)
        return not pending

    def _drop_queue(self) -> None:
        with self._lock:
            dropped, self._queue = self._queue, []
        for needed in dropped:
            self._asked[needed].set_result(None)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                needed = self._queue.pop(0)
                future = self._asked[needed]
            variant = None
            try:
                t0 = time.perf_counter()
                graph = self.build(needed) if self.build is not None else None
                if graph is not None:
                    variant = open_variant(self.spec, graph, self.threads, time.perf_counter() - t0)
                    if variant.layout.modules != needed:
                        raise ValueError(f"the graph built adapts {variant.width} layers, not the {len(needed)} asked")
            except Exception as e:  # noqa: BLE001 - a variant is an optimisation: the covering graph serves on
                log.warning("ONNX graph for %d adapted layers not built (%s: %s); the covering graph serves them",
                            len(needed), type(e).__name__, e)
                variant = None
            if variant is not None:
                with self._lock:
                    self._ready[needed] = variant
                log.info("ONNX graph for %d adapted layers ready in %.1fs (%.1f MB)", variant.width,
                         variant.built_seconds or 0.0, variant.nbytes / 1e6)
            future.set_result(variant)


_LIVE: weakref.WeakSet[GraphVariants] = weakref.WeakSet()


def _drop_all_queues() -> None:
    for variants in list(_LIVE):
        variants._drop_queue()


# before the interpreter joins non-daemon threads at exit (what ``concurrent.futures`` uses;
# plain ``atexit`` runs after that join, too late): without the hook queued builds run to the end
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_drop_all_queues)
