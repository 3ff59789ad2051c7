"""A training worker's frozen bases, one per task kind, each loaded only when a job needs it.

Contract:

* ``TaskBases`` is what a job of one task trains and is gated on: ``trainer_base``, the pristine
  base the trainer copies (never wraps), and ``engine``, the engine that scores candidates for
  the gate, on its own copy of that base (``scoring_engine``), running on the runtime and
  precision serving uses (``runtime``: ONNX / int8 when the service serves on them), so the
  gate's scores are those of the model that will serve the version.
* ``WorkerBases(primary, loaders)``: ``primary`` serves the task of its base (``spec.task``:
  the worker's start-up base, text by default); ``loaders`` maps other task names to a function
  that loads theirs. ``get(task)`` returns the task's bases, calling its loader on the first job
  of that task only (a text-only worker never loads a vision backbone); a task with neither is a
  ``BaseUnavailableError`` naming it. A loader that fails is tried again on the next job.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.catalog import Catalog
from adapters.errors import TailorError
from adapters.runtime.engine import Engine, EngineConfig
from adapters.tasks import canonical_task

if TYPE_CHECKING:
    from adapters.runtime.onnx.choice import RuntimeChoice

# The gate scores one adapter at a time: a small resident set is plenty.
GATE_ENGINE = EngineConfig(max_resident=64, device_slots=33, max_batch_size=32)


class BaseUnavailableError(TailorError):
    """This worker has no base for the job's task (it is not enabled here, or failed to load)."""

    code = "base_unavailable"


@dataclass
class TaskBases:
    trainer_base: Any  # pristine: the trainer copies it, never wraps it
    # scores candidates for the gate, on its own copy of the base; None for a task whose gate scores
    # on trainer_base itself (text generation: adapters.jobs.generation_gate)
    engine: Engine | None


def scoring_engine(base: Any, catalog: Catalog, runtime: RuntimeChoice | None = None,
                   graph_dir: Path | None = None) -> Engine:
    """An engine for the gate on a deep copy of ``base`` (the engine wraps its base's modules),
    on ``runtime`` as serving applies it (graphs from ``graph_dir``, the service's cache; target-set
    variants only as the serving process cached them: a job worker never exports one)."""
    engine = Engine(replace(base, model=copy.deepcopy(base.model)), catalog, GATE_ENGINE)
    if runtime is not None and runtime.runtime != "torch":
        from adapters.runtime.onnx.runtime import apply_runtime

        apply_runtime(engine, runtime, graph_dir, variants="cached")
    return engine


def load_task_bases(base: Any, catalog: Catalog, runtime: RuntimeChoice | None = None,
                    graph_dir: Path | None = None) -> TaskBases:
    return TaskBases(trainer_base=base, engine=scoring_engine(base, catalog, runtime, graph_dir))


@dataclass
class WorkerBases:
    primary: TaskBases
    loaders: Mapping[str, Callable[[], TaskBases]] = field(default_factory=dict)
    _loaded: dict[str, TaskBases] = field(default_factory=dict, repr=False)

    def get(self, task: str) -> TaskBases:
        task = canonical_task(task)
        if task == self.primary.trainer_base.spec.task:
            return self.primary
        if task not in self._loaded:
            loader = self.loaders.get(task)
            if loader is None:
                raise BaseUnavailableError(f"this training worker has no {task} base (not enabled here)")
            try:
                self._loaded[task] = loader()
            except TailorError:
                raise
            except Exception as e:  # noqa: BLE001 - said on the job; the next job tries again
                raise BaseUnavailableError(f"this training worker could not load its {task} base: "
                                           f"{type(e).__name__}: {e}") from e
        return self._loaded[task]

    def loaded(self) -> list[str]:
        """The tasks whose bases are loaded now (the primary's first)."""
        return [self.primary.trainer_base.spec.task, *self._loaded]
