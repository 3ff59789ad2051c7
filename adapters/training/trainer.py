"""Train one tenant's text adapter on the frozen shared base: ``train``.

``train(base, train_texts, train_label_ids, labels, val_texts, val_label_ids, method=..., hp=...,
callbacks=..., checkpoint_dir=..., threads=...)`` checks the data and settings, resolves
``"auto"`` hyper-parameters for the data size and method (with the search on, the
learning rate and rank are picked by successive halving: ``adapters.training.search``), and
runs the shared training loop
(``adapters.training.loop``: schedule, validation, early stopping, divergence, checkpoints,
yielding) on a ``TextTask`` (``adapters.training.text_task``: the model per method, batches,
pooling, the adapter). It never touches ``base.model``. Images: ``adapters.training.image_task``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

from adapters.base import BaseModel
from adapters.errors import DatasetError
from adapters.training.callbacks import TrainCallbacks, TrainResult
from adapters.training.errors import TrainingCancelled, TrainingDiverged, TrainingYielded
from adapters.training.hyperparams import HyperparameterError, Hyperparameters, ResolvedHyperparameters
from adapters.training.loop import fit
from adapters.training.search import search_fit
from adapters.training.text_task import TextTask

METHODS = ("lora", "head", "full")
__all__ = ["METHODS", "TrainCallbacks", "TrainResult", "TrainingCancelled", "TrainingDiverged", "TrainingYielded",
           "check_data", "check_method", "train"]


def train(
    base: BaseModel, train_texts: list[str], train_label_ids: list[int], labels: tuple[str, ...],
    val_texts: list[str], val_label_ids: list[int], *, method: str = "lora",
    hp: Hyperparameters | ResolvedHyperparameters | None = None, callbacks: TrainCallbacks | None = None,
    checkpoint_dir: Path | None = None, threads: int | None = None,
) -> TrainResult:
    check_method(method)
    labels = tuple(labels)
    check_data(labels, train_texts, train_label_ids, "training", unit="texts")
    check_data(labels, val_texts, val_label_ids, "validation", unit="texts")
    train_label_ids, val_label_ids = [int(i) for i in train_label_ids], [int(i) for i in val_label_ids]
    rhp = hp if isinstance(hp, ResolvedHyperparameters) else resolve_text_hyperparameters(
        hp or Hyperparameters(), train_texts, method, base)
    max_pos = base.positions
    if max_pos is not None and rhp.max_length > max_pos:
        raise HyperparameterError(f"max_length {rhp.max_length} exceeds the base model's {max_pos} positions",
                                  param="hyperparameters.max_length")
    if rhp.search and method == "lora":  # successive halving over what is left to choose
        def make_task(h: ResolvedHyperparameters) -> TextTask:
            return TextTask(base, labels, method, h, train_texts, train_label_ids, val_texts, val_label_ids)

        return search_fit(make_task, rhp, len(train_texts), callbacks=callbacks, checkpoint_dir=checkpoint_dir,
                          threads=threads)
    task = TextTask(base, labels, method, rhp, train_texts, train_label_ids, val_texts, val_label_ids)
    return fit(task, rhp, callbacks=callbacks, checkpoint_dir=checkpoint_dir, threads=threads)


def resolve_text_hyperparameters(hp: Hyperparameters, texts: Sequence[str], method: str,
                                 base: BaseModel) -> ResolvedHyperparameters:
    """``hp`` resolved for these training texts on ``base``: its auto ``max_length`` from their
    token counts, up to ``base.length_cap`` (``hyperparams.auto_max_length``)."""
    cap = base.length_cap
    return hp.resolve(len(texts), method, base.device, lengths=base.token_counts(texts, cap), cap=cap)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise HyperparameterError(f"method must be one of {', '.join(METHODS)}, got {method!r}", param="method")


def check_data(labels: tuple[str, ...], examples: object, ids: list[int], which: str, *, unit: str) -> None:
    """``examples`` (a sized collection of ``unit``) and ``ids`` form a usable ``which`` set."""
    if len(labels) < 2:
        raise DatasetError(f"a classifier needs at least 2 labels, got {len(labels)}", param="labels")
    n = len(examples)  # type: ignore[arg-type]
    if not n:
        raise DatasetError(f"the {which} set is empty", param=which)
    if n != len(ids):
        raise DatasetError(f"the {which} set has {n} {unit} but {len(ids)} label ids", param=which)
    bad = next((i for i in ids if not _is_label_id(i, len(labels))), None)
    if bad is not None:
        raise DatasetError(f"the {which} set has label id {bad!r}; expected 0..{len(labels) - 1}", param=which)


def _is_label_id(i: object, n: int) -> bool:
    if isinstance(i, bool):
        return False
    try:
        return 0 <= operator.index(i) < n  # ints, numpy ints
    except TypeError:
        return False
