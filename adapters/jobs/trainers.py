"""Which trainer a job of each task runs: ``trainer_for(task)``.

A trainer is called as ``trainer(base, train_ds, val_ds, *, method, hp, callbacks,
checkpoint_dir, threads)`` with the worker's pristine base of the task and the job's datasets
(``adapters.jobs.task_data``) and returns the ``TrainResult`` of ``adapters.training``. A task
with no trainer in this build is a ``TrainingUnavailableError`` (the job fails saying so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.errors import TailorError
from adapters.tasks import TEXT_CLASSIFICATION
from adapters.training import TrainResult, train


class TrainingUnavailableError(TailorError):
    """No trainer for the job's task in this build."""

    code = "training_unavailable"


def _train_text(base: Any, train_ds: Any, val_ds: Any, **kw: Any) -> TrainResult:
    return train(base, train_ds.texts(), train_ds.label_ids(), train_ds.labels, val_ds.texts(),
                 val_ds.label_ids(), **kw)


TRAINERS: dict[str, Callable[..., TrainResult]] = {TEXT_CLASSIFICATION: _train_text}


def trainer_for(task: str) -> Callable[..., TrainResult]:
    if task not in TRAINERS:
        raise TrainingUnavailableError(f"{task} training is not available yet in this build of Tailor",
                                       param="task")
    return TRAINERS[task]
