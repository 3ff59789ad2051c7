"""The text-generation job trainer (``adapters.tasks.kind.TaskTrainer``): ``trainer()``.

``parse`` is ``GenerationHyperparameters.from_dict`` (settings only: cheap, as ``JobManager.submit``
runs it); ``resolve`` and ``train`` import the training code (``generation_task``: torch, peft,
the loop) on their first call, so checking a job's settings never loads it.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from adapters.tasks.kind import TaskTrainer
from adapters.training.generation_hyperparams import GenerationHyperparameters


def trainer() -> TaskTrainer:
    def resolve(hp: GenerationHyperparameters, train_ds: Sized, method: str, base: Any) -> Any:
        from adapters.training.generation_task import resolve_generation_hyperparameters

        return resolve_generation_hyperparameters(hp, len(train_ds), method, base)

    def train(base: Any, train_ds: Any, val_ds: Any, **kw: Any) -> Any:
        from adapters.training.generation_task import train_generation

        return train_generation(base, train_ds, val_ds, **kw)

    return TaskTrainer(parse=GenerationHyperparameters.from_dict, resolve=resolve, train=train)
