"""Text classification: a tenant's labels for short texts, on a frozen encoder (MiniLM).

The task kind (``adapters.tasks.kind.TaskKind``) Tailor started with; every adapter written
before tasks had kinds (manifest ``task: "classification"``) is one. Datasets: JSON Lines or CSV
of ``text``/``label`` (``adapters.datasets``). Predict requests carry texts in ``inputs``.
"""

from __future__ import annotations

from typing import Any

from adapters.datasets import Dataset, DatasetLimits
from adapters.datasets import parse_dataset as _parse_text_dataset
from adapters.tasks import TEXT_CLASSIFICATION

name = TEXT_CLASSIFICATION
input_field = "inputs"
training: Any = None  # the trainer's hooks for this task (adapters.training), wired in there


def default_dataset_limits() -> DatasetLimits:
    return DatasetLimits()


def parse_dataset(data: bytes, *, format: str | None = None, limits: DatasetLimits | None = None,
                  what: str = "training file") -> Dataset:
    """``adapters.datasets.parse_dataset``: JSON Lines or CSV of ``text``/``label``."""
    return _parse_text_dataset(data, format=format, limits=limits or default_dataset_limits(), what=what)
