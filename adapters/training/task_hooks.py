"""The seam between the training loop and a task kind: what the loop asks of a task.

The loop (``adapters.training.loop``) owns everything every task trains the same way: AdamW,
the warmup/decay schedule, gradient clipping, per-epoch validation, early stopping, the best
epoch's weights, divergence checks, checkpoints, mid-epoch yield and resume, callbacks. A task
(``text_task.TextTask``, ``image_task.ImageTask``) owns what differs: the trainable model for a
method, how examples become batches, the forward pass, what a checkpoint must match and the
adapter the trained model becomes. One object per run; the loop calls, in this order:
``build`` (once), ``encode`` (once), then per step ``set_training(True)`` / ``train_batch`` /
``forward``, per validation ``set_training(False)`` / ``val_batch`` / ``forward``, and finally
``artifact``. ``fingerprint`` may be called at any time (it needs no model). A task may also
have ``objective()`` (an ``Objective``: loss, validation metrics, the best epoch); without it the
loop trains it as a classifier (``forward`` gives logits ``[B, len(labels)]``). And a task may
have ``micro_batches(batch)``: how a batch from ``train_batch`` or ``val_batch`` goes through
the model in parts (``MicroBatch``es, e.g. within a token budget: ``token_budget.split``); the
loop then runs a training step as one forward and backward per part, each part's loss weighted
by its share, and one optimizer step (gradient accumulation), and a validation chunk as one
forward per part, the rows put back in the batch's order (``forward_parts``). Without it every
batch goes whole. Last, a task may have ``solve(poll)``: a closed-form fit right after
``encode`` (the text head method's L-BFGS probe, ``linear_probe``) returning what to report
(``train_loss``, ``message``, other figures for the epoch's metrics), or None to train by steps,
and ``warm_start(poll)``: called before the first step of a fresh run (never on a resumed one),
it may set weights from a closed-form fit (the text task's ``head_init`` probe) and returns a
dict with a ``message`` to report, or None when it changed nothing. It leaves the global random
state as it found it, so a run that resumes from a checkpoint (and skips it) still ends with an
uninterrupted run's weights. And ``input_notes()``: after ``encode``, what the run's events should
say about its inputs (``(level, message)`` pairs; the text task: how many training texts
``max_length`` cuts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from adapters.artifact import AdapterArtifact

Poll = Callable[[], None]  # raises TrainingCancelled when the run must stop; call it between chunks of work


@dataclass(frozen=True)
class ParamGroup:
    """Trainable parameters (with their names, which key checkpoints) trained at ``lr_scale``
    times the schedule's learning rate (layer-wise decay: lower layers get a smaller scale)."""

    params: list[tuple[str, nn.Parameter]]
    lr_scale: float = 1.0


@dataclass(frozen=True)
class MicroBatch:
    """One part of a batch: what ``forward`` takes (``batch``), which of the batch's rows it holds
    (``rows``: positions in the batch, in the order ``forward`` answers them) and its share of the
    step's loss (the objective's loss of this part times ``share``; a batch's shares sum to 1)."""

    batch: Any
    rows: list[int]
    share: float


def forward_parts(forward: Callable[[Any], torch.Tensor], parts: list[MicroBatch], poll: Poll) -> torch.Tensor:
    """``forward`` of every part (``poll`` before each), the rows of its answers ``[rows, ...]`` put
    back in the order of the batch the parts came from."""
    outs = []
    for part in parts:
        poll()
        outs.append(forward(part.batch))
    out = torch.cat(outs)
    order = [r for part in parts for r in part.rows]
    if order == list(range(len(order))):
        return out
    placed = torch.empty_like(out)
    placed[torch.tensor(order, device=out.device)] = out
    return placed


class LoopSettings(Protocol):
    """The resolved hyper-parameters the loop itself reads (every task's resolved settings have them)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    seed: int
    patience: int

    def to_dict(self) -> dict[str, Any]: ...


class Objective(Protocol):
    """What the loop minimises and how it judges a validated epoch. A task may give its own
    (``TrainingTask.objective()``, optional); one that does not is a classifier
    (``loop.Classification``)."""

    criterion: str  # what early stopping watches, for messages ("validation accuracy")

    def watch(self, epochs: int, patience: int) -> Any:
        """The run's divergence watch (``divergence.Watch``: ``step``, ``collapsed``, ``epoch``,
        ``never_healthy``)."""
        ...

    def loss(self, out: Any, idx: torch.Tensor) -> torch.Tensor:
        """The training loss (a scalar with grad) of ``forward``'s output for training examples ``idx``."""
        ...

    def evaluate(self, outputs: list[Any]) -> dict[str, Any]:
        """An epoch's validation metrics from ``forward``'s outputs over the whole validation set
        (in order, chunk by chunk): ``val_loss`` and the objective's own, ``distinct_predictions``
        among them when ``watch`` reads it."""
        ...

    def better(self, metrics: dict[str, Any], state: Any) -> bool:
        """Is this epoch (``metrics``) better than the best so far (``state``: the ``LoopState``)?"""
        ...

    def describe(self, metrics: dict[str, Any]) -> str:
        """The objective's headline validation figure for the epoch's event, e.g. "val accuracy 0.9"."""
        ...

    def result(self, best: dict[str, Any]) -> dict[str, Any]:
        """The best epoch's validation metrics the run's result and the adapter's manifest carry."""
        ...


class TrainingTask(Protocol):
    method: str  # "lora", "head" or "full" (the task refuses any other)
    labels: tuple[str, ...]  # label names; ids index them
    device: torch.device  # where batches and the model live
    train_label_ids: list[int]  # one per training example, in example order
    val_label_ids: list[int]  # one per validation example

    def build(self) -> nn.Module:
        """The trainable model for ``method``: a copy of the frozen base with a fresh head, LoRA
        where the method wants it, ``requires_grad`` set on exactly what trains; on ``device``.
        Called once, right after the loop seeded torch's global generator with the run's seed
        (head and LoRA initialisation draw from it). Never modifies the shared base."""
        ...

    def param_groups(self) -> list[ParamGroup]:
        """Every trainable parameter of the built model, exactly once, grouped by learning-rate
        scale. The order of groups and parameters is fixed for a given run (checkpoints and
        optimizer state follow it)."""
        ...

    def encode(self, poll: Poll) -> None:
        """Prepare whatever stays fixed for the whole run, once, after ``build`` (text: tokenise;
        image: decode, centre crops for validation; ``head``: the frozen features). Calls
        ``poll`` between chunks so a cancel stops it quickly. Uses no random numbers."""
        ...

    def train_batch(self, idx: torch.Tensor, epoch: int) -> Any:
        """The training batch of examples ``idx`` (indices into the training set) in ``epoch``
        (1-based). Any randomness (augmentation) must be a function of (seed, epoch, example
        index) only, never of batch order or of earlier calls, so a run resumed mid-epoch sees
        the same batches as one that never stopped."""
        ...

    def val_batch(self, idx: torch.Tensor) -> Any:
        """The validation batch of examples ``idx``: deterministic, what serving would see."""
        ...

    def forward(self, batch: Any) -> torch.Tensor:
        """Logits ``[B, len(labels)]`` of the built model for a batch from ``train_batch`` or
        ``val_batch`` (grad mode and train/eval mode are the loop's)."""
        ...

    def set_training(self, on: bool) -> None:
        """Put the built model in training (dropout on) or evaluation mode. A task may keep
        parts of it in evaluation mode while training (frozen batch-norm statistics)."""
        ...

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: method, labels, resolved settings, the
        base's fingerprint and the data (examples and labels, training and validation)."""
        ...

    def artifact(self, metrics: dict[str, Any]) -> AdapterArtifact | None:
        """The trained model (best epoch's weights restored) as a checked adapter whose manifest
        carries ``metrics``; None for a method that produces no adapter (``full``)."""
        ...
