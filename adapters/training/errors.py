"""Errors a training run ends with on purpose."""

from __future__ import annotations

from adapters.errors import TailorError


class TrainingCancelled(TailorError):
    """``should_stop`` returned True (a cancel, or a worker shutting down)."""

    code = "cancelled"


class TrainingDiverged(TailorError):
    """The run went wrong (or learnt nothing) and no healthy epoch exists to fall back on."""

    code = "training_diverged"
