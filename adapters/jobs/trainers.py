"""How a job of each task is trained: ``trainer_for(task)`` -> ``TaskTrainer``.

Each task module names its own trainer (``adapters.tasks.kind.TaskKind.trainer``, a
``TaskTrainer``: ``parse``, ``resolve`` and ``train``); this module only asks it, so a task's
trainer is named in one place. A task's training code is imported on its first use (a
text-only process never imports the image trainer). An unknown task, or a task kind without a
trainer in this build, is a ``TrainingUnavailableError``.
"""

from __future__ import annotations

from adapters.errors import TailorError
from adapters.tasks import get_task
from adapters.tasks.kind import TaskTrainer

__all__ = ["TaskTrainer", "TrainingUnavailableError", "trainer_for"]


class TrainingUnavailableError(TailorError):
    """No trainer for the job's task in this build."""

    code = "training_unavailable"


def trainer_for(task: str) -> TaskTrainer:
    try:
        make = getattr(get_task(task), "trainer", None)
    except ValueError:
        make = None
    if make is None:
        raise TrainingUnavailableError(f"{task} training is not available yet in this build of Tailor",
                                       param="task")
    return make()
