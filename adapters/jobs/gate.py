"""The promotion gate: a new version goes live only if it is not worse than what is live.

Candidate and current ``prod`` are scored by the serving engine of the job's task on the same
validation set (the job's held-out data). Mode ``auto`` promotes when the candidate beats always predicting
the most common label (a collapsed, chance-level adapter is refused) and its accuracy is at
least prod's; ``always`` promotes regardless; ``never`` keeps every new version a candidate.
The decision and both scores are recorded on the job so the tenant can see why.

``GateDecision.reason`` says why, never what follows (the job's message adds "is now prod" or
"kept as a candidate" itself, so the outcome is said once).

A task whose adapters are not scored by accuracy has its own gate, named in ``TASK_GATES`` and
returned by ``task_gate(task)`` (text generation: validation loss, ``adapters.jobs.generation_gate``);
it returns a ``GateDecision`` too, with ``baseline`` (what the candidate must beat besides prod).
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from adapters.runtime.engine import Engine
from adapters.runtime.loaded import LoadedAdapter
from adapters.tasks import TEXT_GENERATION
from adapters.training.metrics import classification_metrics

DECODE_CHUNK = 256  # validation inputs decoded at once (224 x 224 images: ~150 MB as tensors)
# tasks with their own gate: module with ``judge(job, trainer_base, catalog, version, validation)``
TASK_GATES = {TEXT_GENERATION: "adapters.jobs.generation_gate"}


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate: dict[str, Any]
    prod: dict[str, Any] | None
    prod_version: int | None
    majority_rate: float
    baseline: dict[str, Any] | None = None  # a task gate's yardstick besides prod (generation: the base model)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["baseline"] is None:  # classification decisions read as they always did
            del d["baseline"]
        return d


def task_gate(task: str) -> Callable[..., GateDecision] | None:
    """The ``judge`` of ``task``'s own gate, or None: the task is scored by accuracy (``score``/``decide``)."""
    module = TASK_GATES.get(task)
    return None if module is None else importlib.import_module(module).judge  # type: ignore[no-any-return]


def score(engine: Engine, adapter: LoadedAdapter, inputs: Sequence[Any], labels: list[str], *,
          limits: Any = None) -> dict[str, Any]:
    """Accuracy and macro-F1 of ``adapter`` on (inputs, true label names), via the engine (and
    ``runtime``: what ran it, ``torch`` or ``onnx-fp32`` / ``onnx-int8``, the serving runtime):
    ``inputs`` as a predict request carries them (texts, image files), decoded by the engine
    (with the task's per-input ``limits``) ``DECODE_CHUNK`` at a time, so a large image
    validation set is never decoded whole."""
    preds: list[Any] = []
    for i in range(0, len(inputs), DECODE_CHUNK):
        rows = engine.decode_rows(inputs[i : i + DECODE_CHUNK], limits=limits)
        preds += engine.classify(rows, [adapter] * len(rows))
    names = sorted(set(labels) | set(adapter.labels))
    index = {n: i for i, n in enumerate(names)}
    m = classification_metrics([index[t] for t in labels], [index[p.label] for p in preds if p], len(names))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": len(inputs),
            "runtime": getattr(engine.serving, "label", "torch")}


def decide(mode: str, candidate: dict[str, Any], prod: dict[str, Any] | None, prod_version: int | None,
           labels: list[str]) -> GateDecision:
    majority = Counter(labels).most_common(1)[0][1] / len(labels)

    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, candidate, prod, prod_version, majority)

    acc = candidate["accuracy"]
    if mode == "always":
        return verdict(True, "promote=always")
    if mode == "never":
        return verdict(False, "promote=never")
    if acc <= majority:
        return verdict(False, f"validation accuracy {acc:.3f} is no better than always predicting the most "
                              f"common label ({majority:.3f})")
    if prod is None:
        return verdict(True, f"first version (validation accuracy {acc:.3f})")
    if acc < prod["accuracy"]:
        return verdict(False, f"validation accuracy {acc:.3f} is below prod v{prod_version}'s "
                              f"{prod['accuracy']:.3f} on the same data")
    return verdict(True, f"validation accuracy {acc:.3f} is not worse than prod v{prod_version}'s "
                         f"{prod['accuracy']:.3f}")
