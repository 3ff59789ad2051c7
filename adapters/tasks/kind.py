"""What a task kind must provide: the seam between Tailor's task-agnostic machinery and a task.

A task kind is a module of ``adapters.tasks`` (``get_task(name)`` returns it) with the members
of ``TaskKind``; its ``serving(base)`` returns a ``TaskServing``: one frozen base of that task,
prepared for mixed-tenant forward passes. ``adapters.runtime.engine.Engine`` drives a
``TaskServing`` and never asks which task it serves; the micro-batcher drives the engine. The
semantics of every member are stated here once; the task modules implement them.

Row inputs: ``decode`` turns what a request carries (a text, image bytes) into *row inputs*,
the unit the batcher queues and ``collate`` batches (a ``str``; a preprocessed ``[3, S, S]``
float32 tensor). Rows of different tenants of one task batch together; rows of different tasks
never share a forward pass (one engine and one batcher per base).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from adapters.fingerprint import BaseSpec
    from adapters.runtime.context import BatchPlan
    from adapters.runtime.loaded import LoadedAdapter
    from adapters.training.callbacks import TrainResult


@dataclass(frozen=True)
class TaskTrainer:
    """How a job of one task is trained: three calls, each the task's own (``adapters.training``).

    * ``parse(hyperparameters)``: the job's requested hyper-parameters, checked (a
      ``HyperparameterError`` naming the key); the result's ``target_modules`` is a tuple of
      names or ``"auto"``. ``JobManager.submit`` runs it, so a bad value is refused before the
      job exists. Cheap: it imports the task's settings, never its training code.
    * ``resolve(parsed, train_ds, method, base)``: concrete values for this training set (its
      size; a text task also its texts' token counts, for ``max_length``) on this base.
    * ``train(base, train_ds, val_ds, *, method, hp, callbacks, checkpoint_dir, threads)``: the
      run, on the worker's pristine base of the task and the job's datasets
      (``adapters.jobs.task_data``), returning ``adapters.training.TrainResult``.
    """

    parse: Callable[[dict[str, Any] | None], Any]
    resolve: Callable[[Any, Sized, str, Any], Any]
    train: Callable[..., TrainResult]


class TaskServing(Protocol):
    """One frozen base of one task, prepared for mixed-tenant serving."""

    base: Any  # the base model it serves (``BaseModel``, ``VisionBase``)
    spec: BaseSpec  # the base's spec: fingerprint, LoRA-capable modules, head width, task

    def decode(self, raw: Sequence[Any], *, param: str, limits: Any = None) -> list[Any]:
        """Check and decode a request's raw inputs into row inputs, in order. A bad one raises
        ``InvalidInputError`` (or a subclass) whose ``param`` is ``f"{param}[{i}]"`` for the
        first bad row ``i``; nothing is decoded past it. ``limits``: the task's per-input limits
        (None: its defaults)."""
        ...

    def check_row(self, row: Any, param: str) -> None:
        """Cheap check that one row input may join a batch shared with other tenants (run by the
        batcher before queueing): ``TypeError`` for a value of the wrong type,
        ``InvalidInputError`` naming ``param`` for a value that would fail the merged forward."""
        ...

    def collate(self, rows: Sequence[Any], adapters: Sequence[LoadedAdapter | None] | None = None) -> Any:
        """Row inputs -> one batch on the base's device, as ``run`` takes it (rows in order);
        ``adapters``: each row's adapter (or None), when the task prepares a row as its adapter
        was trained (text: cut to the adapter's ``max_length``)."""
        ...

    def size(self, batch: Any) -> int:
        """The number of rows in a collated batch."""
        ...

    def run(self, batch: Any, plan: BatchPlan, adapters: Sequence[LoadedAdapter | None]) -> torch.Tensor:
        """One forward pass of the prepared base over ``batch`` with ``plan`` installed (the
        engine installs it and runs in inference mode): per-row logits ``[B, L]`` from the mixed
        head, padded to the batch's widest label set; ``plan.features`` holds the features the
        head read. ``adapters``: each row's adapter (None: the base), for what the task reads
        per row (text: each adapter's pooling)."""
        ...

    def probe_rows(self) -> list[Any]:
        """A few varied row inputs that reach every adapted module (the import probe runs a
        candidate adapter on them and refuses non-finite logits)."""
        ...

    # Optional, for a task whose rows differ in width (text: tokens): with both, the engine may
    # run a collated batch as several forward passes of rows of similar width
    # (``adapters.runtime.width_groups``); without them (images: every row the same size) a batch
    # is always one pass.
    #
    # def widths(self, batch) -> list[int]:
    #     """Each row's width in a collated batch: the positions it really uses (text: its tokens)."""
    #
    # def take(self, batch, rows: list[int]) -> batch:
    #     """Those rows of a collated batch (positions, in that order) as a batch of their own, no
    #     wider than its widest row; ``run`` answers each row as it would in the whole batch."""


class TaskKind(Protocol):
    """A task kind (a module of ``adapters.tasks``)."""

    name: str  # canonical task name (``adapters.tasks.TASK_NAMES``)
    input_field: str  # the predict request's field holding the raw inputs ("inputs", "images")
    peft_task_type: str | None  # peft's ``task_type`` for this task's exports (None: a plain PeftModel)
    # Trailing kernel dimensions of peft's LoRA factors here: () for linear layers, (1, 1) for the
    # 1x1 convs of a vision base (peft's Conv2d LoRA: A [r, C_in, 1, 1], B [C_out, r, 1, 1]); the
    # artifact stores them without (adapters.peft_format reshapes on export and import).
    lora_kernel: tuple[int, ...]

    def parse_dataset(self, data: bytes, *, format: str | None = None, limits: Any = None,
                      what: str = "training file") -> Any:
        """Parse and completely validate an uploaded dataset of this task (``format=None``
        sniffs it); ``DatasetError`` naming the first problem. ``limits``: the task's dataset
        limits type (None: ``default_dataset_limits()``)."""
        ...

    def default_dataset_limits(self) -> Any:
        """The dataset limits ``parse_dataset`` applies when given none."""
        ...

    def trainer(self) -> TaskTrainer:
        """How this task's jobs are trained (``adapters.jobs.trainers.trainer_for`` asks here, the
        one place a task's trainer is named). The trainer's code is imported on first use of
        ``resolve``/``train``: calling this imports no training module of another task."""
        ...

    def serving(self, base: Any) -> TaskServing:
        """Prepare ``base`` (a base model of this task) for mixed-tenant serving, in place and
        idempotently: wrap the modules adapters may target, swap the head for the per-row mixed
        head. Raises ``TypeError`` for a base of another kind."""
        ...
