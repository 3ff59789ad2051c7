"""How a job of each task is trained: ``trainer_for(task)`` -> ``TaskTrainer``.

A ``TaskTrainer`` has three calls, each the task's own (``adapters.training``: text
``Hyperparameters`` and ``train``; image ``ImageHyperparameters`` and ``train_images``):

* ``parse(hyperparameters)``: the job's requested hyper-parameters, checked (a
  ``HyperparameterError`` naming the key); the result's ``target_modules`` is a tuple of names
  or ``"auto"``. ``JobManager.submit`` runs it, so a bad value is refused before the job exists.
* ``resolve(parsed, n_train, method, base)``: concrete values for this data on this base.
* ``train(base, train_ds, val_ds, *, method, hp, callbacks, checkpoint_dir, threads)``: the run,
  on the worker's pristine base of the task and the job's datasets (``adapters.jobs.task_data``),
  returning ``adapters.training.TrainResult``.

A task's trainer code is imported on its first use (a text-only process never imports the image
trainer). A task with no trainer in this build is a ``TrainingUnavailableError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters.errors import TailorError
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION
from adapters.training import Hyperparameters, TrainResult, train


class TrainingUnavailableError(TailorError):
    """No trainer for the job's task in this build."""

    code = "training_unavailable"


@dataclass(frozen=True)
class TaskTrainer:
    parse: Callable[[dict[str, Any] | None], Any]
    resolve: Callable[[Any, int, str, Any], Any]
    train: Callable[..., TrainResult]


def _text() -> TaskTrainer:
    def train_text(base: Any, train_ds: Any, val_ds: Any, **kw: Any) -> TrainResult:
        # validation ids index the TRAINING labels: a separate validation file may lack some
        # labels, and its own label_ids() would then number the rest differently
        index = {label: i for i, label in enumerate(train_ds.labels)}
        val_ids = [index[e.label] for e in val_ds.examples]
        return train(base, train_ds.texts(), train_ds.label_ids(), train_ds.labels, val_ds.texts(), val_ids, **kw)

    return TaskTrainer(parse=Hyperparameters.from_dict,
                       resolve=lambda hp, n, method, base: hp.resolve(n, method, base.device), train=train_text)


def _image() -> TaskTrainer:
    from adapters.training.image_hyperparams import ImageHyperparameters

    def resolve(hp: Any, n: int, method: str, base: Any) -> Any:
        from adapters.training.image_task import resolve_image_hyperparameters

        return resolve_image_hyperparameters(hp, n, method, base)

    def train_images(*args: Any, **kw: Any) -> TrainResult:
        from adapters.training.image_task import train_images

        return train_images(*args, **kw)

    return TaskTrainer(parse=ImageHyperparameters.from_dict, resolve=resolve, train=train_images)


TRAINERS: dict[str, Callable[[], TaskTrainer]] = {TEXT_CLASSIFICATION: _text, IMAGE_CLASSIFICATION: _image}


def trainer_for(task: str) -> TaskTrainer:
    if task not in TRAINERS:
        raise TrainingUnavailableError(f"{task} training is not available yet in this build of Tailor",
                                       param="task")
    return TRAINERS[task]()
