"""Errors a training run ends with on purpose."""

from __future__ import annotations

from adapters.errors import TailorError


class TrainingCancelled(TailorError):
    """``should_stop`` returned True (a cancel, or a worker shutting down)."""

    code = "cancelled"


class TrainingDiverged(TailorError):
    """The run went wrong (or learnt nothing) and no healthy epoch exists to fall back on."""

    code = "training_diverged"


class TrainingYielded(Exception):
    """``should_yield`` said yes: a checkpoint is saved; training again resumes at ``epoch``
    after ``step`` optimizer steps (``mid_epoch``: inside that epoch, else at its start)."""

    def __init__(self, epoch: int, step: int, mid_epoch: bool) -> None:
        where = f"step {step}, inside epoch {epoch}" if mid_epoch else f"the start of epoch {epoch}"
        super().__init__(f"training yielded; it resumes at {where}")
        self.epoch, self.step, self.mid_epoch = epoch, step, mid_epoch
