"""When a training run has gone wrong, judged from its losses and its validation history.

The yardstick is the *prior loss*: the cross-entropy of always predicting the training label
frequencies (ln 2 for two balanced labels). A model at the prior has learnt nothing; one well
above it is worse than guessing. ``Watch`` gives a reason to stop (or None):

* ``step`` -- within an epoch: a non-finite loss, or a 10-step window averaging over 3x the
  first epoch's average (in epoch 1: 3x its own first window), never less than 3x the prior.
  A blow-up on a large set is caught in seconds, not after an hour-long epoch; the prior floor
  keeps an easy set (epoch 1 ending near 0.05) from calling noise at 0.15 divergence.
* ``epoch`` -- after validation: an epoch average over 3x the first epoch's (same floor); or a
  *collapsed* epoch (one label for the whole validation set, which holds >= 2 labels, no better
  than the majority rate) after a healthy one, once the model had learnt (an earlier epoch's
  loss under 0.9x the prior). A collapse while the loss still hovers at the prior is a slow
  start flipping around the decision boundary; it only counts against ``patience``. Before any
  healthy epoch, collapse is slow learning, not divergence, unless the first half of the run
  (at least ``max(2, patience)`` epochs) all collapsed with an average loss over 1.25x the prior
  (a fresh random head starts at up to ~1.2x). Measured: MiniLM LoRA at lr 1e-3 on 50 IMDB
  reviews predicted one label for 7 epochs at losses 0.68-0.70 (prior 0.693), then learnt.
* ``never_healthy`` -- every epoch collapsed: diverged (lower the learning rate) when the
  losses averaged over 1.25x the prior, else "did not converge" (more epochs or data).

The trainer keeps the best healthy epoch when there is one, else raises ``TrainingDiverged``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from adapters.training.errors import TrainingDiverged

WINDOW = 10  # steps per in-epoch loss check
BLOW_UP = 3.0  # loss this many times its early level (or the prior): diverged
WORSE_THAN_GUESSING = 1.25  # average loss this many times the prior: worse than guessing
LEARNT = 0.9  # a loss under this many times the prior: the model had learnt something


def prior_loss(label_ids: list[int]) -> float:
    n = len(label_ids)
    return -sum(c / n * math.log(c / n) for c in Counter(label_ids).values())


@dataclass(frozen=True)
class Watch:
    prior: float  # of the training labels
    majority: float  # the validation set's majority-label rate
    val_labels: int  # distinct labels in the validation set
    epochs: int
    patience: int

    @classmethod
    def for_data(cls, train_ids: list[int], val_ids: list[int], epochs: int, patience: int) -> Watch:
        majority = Counter(val_ids).most_common(1)[0][1] / len(val_ids)
        return cls(prior=prior_loss(train_ids), majority=majority, val_labels=len(set(val_ids)),
                   epochs=epochs, patience=patience)

    def step(self, losses: list[float], first_epoch_loss: float | None) -> str | None:
        """``losses``: this epoch's so far; ``first_epoch_loss``: None while in epoch 1."""
        if not math.isfinite(losses[-1]):
            return f"the training loss became {losses[-1]}"
        if len(losses) % WINDOW or (first_epoch_loss is None and len(losses) <= WINDOW):
            return None
        early = first_epoch_loss if first_epoch_loss is not None else sum(losses[:WINDOW]) / WINDOW
        ref, window = max(self.prior, early), sum(losses[-WINDOW:]) / WINDOW
        if window > BLOW_UP * ref:
            return f"the training loss rose to {window:.3f} over the last {WINDOW} steps, over {BLOW_UP:g}x its " \
                   f"early level {ref:.3f}"
        return None

    def collapsed(self, metrics: dict[str, Any]) -> bool:
        return metrics["distinct_predictions"] == 1 and self.val_labels > 1 and \
            metrics["val_accuracy"] <= self.majority + 1e-9

    def epoch(self, history: list[dict[str, Any]], best_epoch: int) -> str | None:
        """``history``: every epoch so far, each with ``train_loss`` and ``collapsed``; the last is
        the one just validated. ``best_epoch``: the best healthy epoch before it (0: none)."""
        now, first = history[-1], history[0]["train_loss"]
        ref = max(first, self.prior)
        if now["train_loss"] > BLOW_UP * ref:
            return f"the training loss rose to {now['train_loss']:.3f}, over {BLOW_UP:g}x the first epoch's {ref:.3f}"
        if not now["collapsed"]:
            return None
        lowest = min((h["train_loss"] for h in history[:-1]), default=math.inf)
        if best_epoch and lowest < LEARNT * self.prior:
            return f"epoch {now['epoch']} predicted one label for the whole validation set (training loss " \
                   f"{now['train_loss']:.3f}, lowest so far {lowest:.3f})"
        run = _trailing_collapsed(history)
        if best_epoch or run < max(2, self.patience, math.ceil(self.epochs / 2)):
            return None
        mean = sum(h["train_loss"] for h in history[-run:]) / run
        if mean > WORSE_THAN_GUESSING * self.prior:
            return f"{run} epochs in a row predicted one label for the whole validation set with a training " \
                   f"loss ({mean:.3f} on average) above that of always guessing the label frequencies " \
                   f"({self.prior:.3f})"
        return None

    def never_healthy(self, history: list[dict[str, Any]], steps_per_epoch: int,
                      learning_rate: float) -> TrainingDiverged:
        """The error for a run in which every epoch collapsed."""
        losses = [h["train_loss"] for h in history]
        shown = ", ".join(f"{x:.3f}" for x in losses[-10:])
        if sum(losses) / len(losses) > WORSE_THAN_GUESSING * self.prior:
            return TrainingDiverged(
                f"training diverged: every epoch predicted a single label for the whole validation set, with "
                f"training losses ({shown}) well above the {self.prior:.3f} of guessing the label frequencies; "
                f"try a lower learning_rate (this run used {learning_rate:g})")
        return TrainingDiverged(
            f"training did not converge: every epoch predicted a single label for the whole validation set, "
            f"and the training loss ({shown} by epoch) stayed near {self.prior:.3f}, the loss of always "
            f"guessing the label frequencies: the model learnt nothing usable in {len(history)} epochs of "
            f"{steps_per_epoch} steps. Try more epochs or more examples; if the loss jumps around, a lower "
            f"learning_rate (this run used {learning_rate:g}).")


def _trailing_collapsed(history: list[dict[str, Any]]) -> int:
    n = 0
    for h in reversed(history):
        if not h["collapsed"]:
            break
        n += 1
    return n
