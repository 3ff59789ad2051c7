"""Text classification: a tenant's labels for short texts, on a frozen encoder (MiniLM).

The task kind (``adapters.tasks.kind.TaskKind``) Tailor started with; every adapter written
before tasks had kinds (manifest ``task: "classification"``) is one. Datasets: JSON Lines or CSV
of ``text``/``label`` (``adapters.datasets``). Predict requests carry texts in ``inputs``.

Serving (``TextServing``, a ``TaskServing``) over an ``adapters.base.BaseModel``:

* prepared: every linear layer of the spec wrapped in ``MultiLoraLinear``, the classifier
  replaced by the per-row ``MixedHead``, and (where the base can pool tokens) the backbone
  tapped so the head can pool each row the way its adapter was trained (``adapters.pooling``);
* row inputs are the texts themselves: ``decode`` and ``check_row`` refuse a text that is not
  valid Unicode (``adapters.runtime.inputs``), ``collate`` tokenises, ``run`` calls the Hugging
  Face model and reads its ``.logits``, with each row's pooling (an adapter's, or the base's
  for a base row) in the plan when any row pools otherwise than the model's own pooler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapters.base import BaseModel, take_rows
from adapters.datasets import Dataset, DatasetLimits
from adapters.datasets import parse_dataset as _parse_text_dataset
from adapters.fingerprint import BaseSpec
from adapters.pooling import POOLER, Pooling, tap_tokens
from adapters.runtime.context import BatchPlan
from adapters.runtime.head import MixedHead, keep_tokens, wants_all_layers
from adapters.runtime.inputs import check_text, check_texts
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.lora_layer import wrap_linears
from adapters.tasks import TEXT_CLASSIFICATION
from adapters.tasks.kind import TaskTrainer

name = TEXT_CLASSIFICATION
input_field = "inputs"
peft_task_type: str | None = "SEQ_CLS"
lora_kernel: tuple[int, ...] = ()


def default_dataset_limits() -> DatasetLimits:
    return DatasetLimits()


def parse_dataset(data: bytes, *, format: str | None = None, limits: DatasetLimits | None = None,
                  what: str = "training file") -> Dataset:
    """``adapters.datasets.parse_dataset``: JSON Lines or CSV of ``text``/``label``."""
    return _parse_text_dataset(data, format=format, limits=limits or default_dataset_limits(), what=what)


def trainer() -> TaskTrainer:
    """``adapters.training``'s ``Hyperparameters`` and ``train``, on a job's text datasets."""
    from adapters.training import Hyperparameters

    def resolve(hp: Any, train_ds: Dataset, method: str, base: Any) -> Any:
        from adapters.training.trainer import resolve_text_hyperparameters

        return resolve_text_hyperparameters(hp, train_ds.texts(), method, base)

    def train(base: Any, train_ds: Dataset, val_ds: Dataset, **kw: Any) -> Any:
        from adapters.training import train as train_texts

        # validation ids index the TRAINING labels: a separate validation file may lack some
        # labels, and its own label_ids() would then number the rest differently
        index = {label: i for i, label in enumerate(train_ds.labels)}
        val_ids = [index[e.label] for e in val_ds.examples]
        return train_texts(base, train_ds.texts(), train_ds.label_ids(), train_ds.labels, val_ds.texts(), val_ids,
                           **kw)

    return TaskTrainer(parse=Hyperparameters.from_dict, resolve=resolve, train=train)


# Short and long, plain and odd: enough to reach every layer with ordinary and unusual tokens.
PROBE_TEXTS = (
    "hello",
    "The service was quick and friendly, and the staff answered every question we had.",
    "terrible!!! never again... 0/10 ??? $$$ 1234567890",
    "Grüße aus Köln, 東京からこんにちは, привет, مرحبا 🙂",
    " ".join(["a long text that fills the sequence with many repeated tokens"] * 40),
)


class TextServing:
    """A text base prepared for mixed-tenant serving (see the module docstring)."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.spec: BaseSpec = base.spec
        model = base.model
        wrap_linears(model, list(base.spec.linear_shapes))
        if not isinstance(getattr(model, base.head_name), MixedHead):
            setattr(model, base.head_name, MixedHead(base.spec.head_in_features))
        if base.spec.pools_tokens and not getattr(model, "_tailor_tokens_tapped", False):
            tap_tokens(model, keep_tokens, wants_all_layers)
            model._tailor_tokens_tapped = True  # one tap per model, however many engines wrap it

    def decode(self, raw: Sequence[Any], *, param: str = input_field, limits: Any = None) -> list[str]:
        check_texts(raw, param)
        return list(raw)

    def check_row(self, row: Any, param: str) -> None:
        if not isinstance(row, str):
            raise TypeError(f"{param} must be a str, not {type(row).__name__}")
        check_text(row, param)

    def collate(self, rows: Sequence[str], adapters: Sequence[LoadedAdapter | None] | None = None,
                ) -> dict[str, torch.Tensor]:
        """Tokenised rows, each cut to its adapter's ``max_length`` (the base's for a base row or
        an adapter that records none), padded together."""
        base = self.base
        cap = base.positions or 1 << 30  # never past the model's positions
        lengths = [base.max_length if a is None or a.max_length is None else min(a.max_length, cap)
                   for a in (adapters or [None] * len(rows))]
        if len(lengths) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(lengths)} adapters")
        return base.tokenize(list(rows), lengths)

    def size(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def widths(self, batch: dict[str, torch.Tensor]) -> list[int]:
        return batch["attention_mask"].sum(dim=1).tolist()

    def take(self, batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        return take_rows(batch, rows)

    def run(self, batch: dict[str, torch.Tensor], plan: BatchPlan,
            adapters: Sequence[LoadedAdapter | None]) -> torch.Tensor:
        plan.poolings = self._poolings(adapters)
        return self.base.model(**batch).logits

    def probe_rows(self) -> list[str]:
        return list(PROBE_TEXTS)

    def _poolings(self, rows: Sequence[LoadedAdapter | None]) -> tuple[Pooling, ...] | None:
        """Each row's pooling, or None when every row reads the model's own pooled output."""
        kinds = tuple(self.base.spec.pooling if a is None else a.pooling for a in rows)
        return None if all(k == POOLER for k in kinds) else kinds


def serving(base: BaseModel) -> TextServing:
    if not isinstance(base, BaseModel):
        raise TypeError(f"a text-classification engine needs a text BaseModel, not {type(base).__name__}")
    return TextServing(base)
