"""What a caller hears from a training run, and what it gets back: ``TrainCallbacks``, ``TrainResult``.

Callbacks (each optional): ``on_step(step, total, epoch, loss)`` every 10 optimizer steps and at
the last (``loss``: the mean of the last 10); ``on_epoch(epoch, metrics)`` after each
validation; ``should_stop()`` polled between batches (True: ``TrainingCancelled``);
``on_event(level, message)`` for human-readable news; ``on_checkpoint(folder)`` after each
checkpoint is written; ``should_yield(at_epoch_end)`` -- give the worker back now? (see
``adapters.training.loop``, "Yielding"); ``on_search(record)`` for the hyper-parameter
search's rungs and choice (``adapters.training.search``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from adapters.artifact import AdapterArtifact


@dataclass
class TrainCallbacks:
    on_step: Callable[[int, int, int, float], None] | None = None  # step, total, epoch, loss
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_event: Callable[[str, str], None] | None = None  # level, message
    on_checkpoint: Callable[[Path], None] | None = None  # after each checkpoint is saved
    # give the worker back now? (argument: at an epoch end)
    should_yield: Callable[[bool], bool] | None = None
    # the hyper-parameter search's news: each rung's candidates and scores, then its choice
    # (a JSON-able dict with "stage"; see adapters.training.search)
    on_search: Callable[[dict[str, Any]], None] | None = None


@dataclass
class TrainResult:
    artifact: AdapterArtifact | None
    model: nn.Module  # the trained copy (eval mode, best epoch's weights), for benchmarks
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    trainable_params: int
    total_params: int
    seconds: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
