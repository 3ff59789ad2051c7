"""Task kinds: what differs between text and image classification (and the next kind).

Contract:

* A task kind has a name in ``TASK_NAMES`` (``TEXT_CLASSIFICATION``, ``IMAGE_CLASSIFICATION``,
  ``TEXT_GENERATION``) and one module here (``text_classification``, ``image_classification``,
  ``text_generation``) that owns everything
  about it the rest of Tailor must not know: the request field its inputs arrive in, the
  dataset format, how a base is prepared for mixed-tenant serving and how its rows are decoded,
  batched and run (``adapters.tasks.kind.TaskKind`` lists the members, each with its semantics).
  Store, registry, jobs, cache, slots and batcher stay task-agnostic. ``HEADLESS_TASKS`` are the
  kinds whose adapters carry no labels and no head (generation: LoRA weights alone).
* ``canonical_task(name)`` validates a task name and maps the legacy manifest value
  ``"classification"`` (every adapter written before tasks had kinds) to
  ``"text-classification"``: old adapters keep working. Anything else raises ``ValueError``.
* ``manifest_value(task)`` is what a new adapter's manifest records as its ``task``: the legacy
  ``"classification"`` for text (so every Tailor version reads a new text adapter, as before),
  the canonical name for every other kind.
* ``get_task(name)`` returns the task kind (its module) for a canonical or legacy name.
* Importing this package is cheap (no torch, no task module): task modules are imported by
  ``get_task`` on first use, so any module (the artifact format, the job system) may import
  the names from here without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from adapters.tasks.kind import TaskKind

TEXT_CLASSIFICATION = "text-classification"
IMAGE_CLASSIFICATION = "image-classification"
TEXT_GENERATION = "text-generation"
TASK_NAMES = (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, TEXT_GENERATION)
# tasks whose adapters are LoRA weights alone: no labels, no classification head (adapters.artifact)
HEADLESS_TASKS = (TEXT_GENERATION,)
LEGACY_NAMES = {"classification": TEXT_CLASSIFICATION}  # manifests written before task kinds
ACCEPTED_NAMES = TASK_NAMES + tuple(LEGACY_NAMES)  # what a manifest's ``task`` may say
_MODULES = {TEXT_CLASSIFICATION: "adapters.tasks.text_classification",
            IMAGE_CLASSIFICATION: "adapters.tasks.image_classification",
            TEXT_GENERATION: "adapters.tasks.text_generation"}


def canonical_task(name: Any) -> str:
    """The canonical name of task ``name`` (legacy ``"classification"``: text); ``ValueError``
    naming the supported tasks for anything else."""
    if isinstance(name, str):
        if name in _MODULES:
            return name
        if name in LEGACY_NAMES:
            return LEGACY_NAMES[name]
    shown = repr(name) if isinstance(name, str) and len(name) <= 60 else type(name).__name__
    raise ValueError(f"unsupported task {shown}; supported: {', '.join(TASK_NAMES)}")


def manifest_value(task: str) -> str:
    """The ``task`` a new adapter of task ``task`` records in its manifest (see the contract)."""
    task = canonical_task(task)
    return next((legacy for legacy, canon in LEGACY_NAMES.items() if canon == task), task)


def get_task(name: str) -> TaskKind:
    """The task kind called ``name`` (canonical or legacy); ``ValueError`` for an unknown one."""
    return cast("TaskKind", importlib.import_module(_MODULES[canonical_task(name)]))


def task_of_manifest(manifest: Any) -> str:
    """The canonical task of a stored adapter from its manifest (a dict as the registry keeps it,
    or an ``AdapterManifest``); a manifest without ``task`` is a legacy text adapter."""
    task = manifest.get("task", "classification") if isinstance(manifest, dict) else manifest.task
    return canonical_task(task)


__all__ = ["ACCEPTED_NAMES", "HEADLESS_TASKS", "IMAGE_CLASSIFICATION", "TEXT_GENERATION", "LEGACY_NAMES", "TASK_NAMES", "TEXT_CLASSIFICATION",
           "canonical_task", "get_task", "manifest_value", "task_of_manifest"]
