"""Text generation as a training task (``task_hooks.TrainingTask``) on a frozen ``CausalBase``,
and ``train_generation`` (what a job runner calls for a generation job; ``generation_trainer`` names it).

The trainable model is a deep copy of ``base.model`` (never the shared base) in fp32 with peft
LoRA on the decoder's linear layers (``target_modules``; auto: every one, q/k/v/o and
gate/up/down), nothing else trainable. The loss is the mean cross-entropy over the tokens the
dataset's loss mask marks (``adapters.generation.datasets.encode``: assistant messages and
their end-of-turn token, or completions and EOS), every other token masked out; logits are
computed only at those positions (the vocabulary projection of every position would dominate
memory). The task's objective (``GenerationObjective``) makes the shared loop
(``adapters.training.loop``: schedule, clipping, checkpoints, yield/resume, cancel, divergence)
validate by token-weighted validation loss, perplexity and next-token accuracy on the masked
tokens, and keep the epoch with the lowest validation loss (early stopping on it, patience
from the hyper-parameters). Before training it measures the base model itself on the same
validation set (``base_val_loss``, ``base_val_perplexity`` in the result): the yardstick the
gate refuses a candidate against.

``forward`` returns per-example sums ``[B, 3]``: masked-token negative log-likelihood, masked
tokens, correct next-token predictions -- the objective turns them into losses and metrics.
A batch whose padded size exceeds the token budget (``token_budget``: rows x longest row,
``TOKEN_BUDGET`` by default) goes through the model as micro-batches within it
(``micro_batches``, the loop's seam): in training each one's forward and backward in turn, its
loss weighted by its share of the step's masked tokens, so the step's gradient is the unsplit
batch's; in validation (the base model's measurement and the gate's included: ``budgeted_stats``)
one forward each. Examples, order, batch size and schedule are unchanged.
Examples over ``max_length`` tokens are a ``DatasetError`` naming their line (never truncated).
The artifact is head-less: task ``text-generation``, no labels, ``head_in_features`` 0, LoRA
``A [r, in]`` / ``B [out, r]`` per decoder module path of the base (``base.spec.linear_shapes``).
A run is deterministic for a seed on CPU (the loop seeds order and dropout per epoch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.artifact import AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings
from adapters.generation.datasets import Encoded, GenerationDataset, encode_all
from adapters.tasks import TEXT_GENERATION, manifest_value
from adapters.training.callbacks import TrainCallbacks, TrainResult
from adapters.training.divergence import Watch
from adapters.training.generation_hyperparams import (
    METHOD, GenerationHyperparameters, ResolvedGenerationHyperparameters,
)
from adapters.training.hyperparams import HyperparameterError
from adapters.training.loop import EVAL_CHUNK, fit
from adapters.training.task_hooks import MicroBatch, ParamGroup, Poll, forward_parts
from adapters.training.token_budget import TOKEN_BUDGET, split

IGNORE = -100


def resolve_generation_hyperparameters(hp: GenerationHyperparameters, n_train: int, method: str,
                                       base: Any) -> ResolvedGenerationHyperparameters:
    """``hp.resolve`` for ``base`` (its context length); the LoRA targets are checked against it."""
    rhp = hp.resolve(n_train, method, int(getattr(base, "max_context", 2048)))
    target_paths(base.spec, rhp.target_modules)
    return rhp


def target_paths(spec: Any, targets: Sequence[str]) -> list[str]:
    """The decoder module paths ``targets`` select; ``HyperparameterError`` naming one that selects none."""
    paths: set[str] = set()
    for t in targets:
        found = spec.match_target(t)
        if not found:
            raise HyperparameterError(f"target module {t!r} is not a decoder linear layer of the base model "
                                      f"(e.g. {', '.join(sorted({p.rpartition('.')[2] for p in spec.linear_shapes}))})",
                                      param="hyperparameters.target_modules")
        paths.update(found)
    return sorted(paths)


def train_generation(
    base: Any, train: GenerationDataset, validation: GenerationDataset, *, method: str = METHOD,
    hp: GenerationHyperparameters | ResolvedGenerationHyperparameters | None = None,
    callbacks: TrainCallbacks | None = None, checkpoint_dir: Path | None = None, threads: int | None = None,
    token_budget: int = TOKEN_BUDGET,
) -> TrainResult:
    """Train a generation adapter on ``train``, validated on ``validation`` (both non-empty, one
    format), at most ``token_budget`` padded tokens per training forward pass."""
    from adapters.errors import DatasetError

    if len(train) == 0 or len(validation) == 0:
        raise DatasetError("the training and validation sets must both hold examples", param="training")
    if validation.format != train.format:
        raise DatasetError(f"the validation set holds {validation.format} examples, the training set "
                           f"{train.format} examples", param="validation")
    rhp = hp if isinstance(hp, ResolvedGenerationHyperparameters) else resolve_generation_hyperparameters(
        hp or GenerationHyperparameters(), len(train), method, base)
    task = GenerationTask(base, rhp, train, validation, token_budget=token_budget)
    return fit(task, rhp, callbacks=callbacks, checkpoint_dir=checkpoint_dir, threads=threads)


class GenerationTask:
    """The ``TrainingTask`` of a generation run (see the module docstring)."""

    method = METHOD
    labels: tuple[str, ...] = ()

    def __init__(self, base: Any, hp: ResolvedGenerationHyperparameters, train: GenerationDataset,
                 validation: GenerationDataset, *, token_budget: int = TOKEN_BUDGET) -> None:
        self.base, self.hp, self.train, self.validation = base, hp, train, validation
        self.token_budget = token_budget
        self.device: torch.device = base.device
        # one id per example (the loop counts examples by them); generation has no labels
        self.train_label_ids = [0] * len(train)
        self.val_label_ids = [0] * len(validation)
        self.model: nn.Module = nn.Module()
        self._train: list[Encoded] = []
        self._val: list[Encoded] = []
        self.pad_id = _pad_id(base.tokenizer)
        self.base_val: dict[str, float] = {}

    def objective(self) -> GenerationObjective:
        return GenerationObjective(self)

    def build(self) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        hp = self.hp
        paths = target_paths(self.base.spec, hp.target_modules)
        model = copy.deepcopy(self.base.model).float()
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                         target_modules=paths)
        self.model = get_peft_model(model, cfg).to(self.device)
        return self.model

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup([(n, p) for n, p in self.model.named_parameters() if p.requires_grad])]

    def encode(self, poll: Poll) -> None:
        tok = self.base.tokenizer
        poll()
        self._train = encode_all(self.train, tok, max_tokens=self.hp.max_length, which="training")
        poll()
        self._val = encode_all(self.validation, tok, max_tokens=self.hp.max_length, which="validation")
        self.base_val = self._base_validation(poll)

    def train_batch(self, idx: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        return self._batch(self._train, idx)

    def val_batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._batch(self._val, idx)

    def micro_batches(self, batch: dict[str, torch.Tensor]) -> list[MicroBatch]:
        return split(batch, self.token_budget)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return example_stats(self.model, batch)

    def set_training(self, on: bool) -> None:
        self.model.train(on)

    def fingerprint(self) -> str:
        what = [TEXT_GENERATION, self.method, self.hp.to_dict(), self.base.spec.fingerprint]
        h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
        for ds in (self.train, self.validation):
            h.update(json.dumps([e.to_record() for e in ds.examples], sort_keys=True).encode())
            h.update(b"\x00")
        return h.hexdigest()

    def artifact(self, metrics: dict[str, Any]) -> AdapterArtifact:
        from peft.tuners.lora import LoraLayer

        hp, spec = self.hp, self.base.spec
        lora = {}
        for path, m in self.model.get_base_model().named_modules():
            if isinstance(m, LoraLayer):
                a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                lora[path] = (a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
        settings = LoraSettings(r=hp.lora_r, alpha=hp.lora_alpha, target_modules=hp.target_modules,
                                dropout=hp.lora_dropout)
        weights = AdapterWeights(lora=lora, head_weight=torch.zeros(0, 0), head_bias=torch.zeros(0))
        manifest = AdapterManifest(base_fingerprint=spec.fingerprint, labels=(), lora=settings, head_in_features=0,
                                   task=manifest_value(TEXT_GENERATION), metrics=metrics, source="tailor")
        art = AdapterArtifact(manifest=manifest, weights=weights)
        art.validate()
        art.check_base(spec)
        return art

    # -- pieces -----------------------------------------------------------------------------

    def _batch(self, encoded: list[Encoded], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return pad_batch([encoded[i] for i in idx.tolist()], self.pad_id, self.device)

    def _base_validation(self, poll: Poll) -> dict[str, float]:
        """The base model's own validation figures (LoRA switched off)."""
        self.model.eval()
        with self.model.disable_adapter():
            stats = budgeted_stats(self.model, self._val, self.pad_id, self.device, self.token_budget, poll)
        m = summarise(stats)
        return {"base_val_loss": m["val_loss"], "base_val_perplexity": m["val_perplexity"],
                "base_val_token_accuracy": m["val_token_accuracy"]}


class GenerationObjective:
    """The loop's objective for generation (``task_hooks.Objective``): token-weighted masked
    cross-entropy; the best epoch has the lowest validation loss; divergence is a non-finite or
    exploding loss (``divergence.Watch`` with no label prior; nothing collapses)."""

    criterion = "validation loss"

    def __init__(self, task: GenerationTask) -> None:
        self.task = task

    def watch(self, epochs: int, patience: int) -> Watch:
        return _LossWatch(prior=0.0, majority=1.0, val_labels=0, epochs=epochs, patience=patience)

    def loss(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return out[:, 0].sum() / out[:, 1].sum().clamp(min=1.0)

    def evaluate(self, outputs: list[torch.Tensor]) -> dict[str, Any]:
        return summarise(torch.cat(outputs))

    def better(self, metrics: dict[str, Any], state: Any) -> bool:
        if not state.best_epoch:
            return True
        return bool(metrics["val_loss"] < state.history[state.best_epoch - 1]["val_loss"] - 1e-4)

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"val perplexity {metrics['val_perplexity']:.3f}, val token accuracy "
                f"{metrics['val_token_accuracy']:.4f}")

    def result(self, best: dict[str, Any]) -> dict[str, Any]:
        return {"val_loss": best["val_loss"], "val_perplexity": best["val_perplexity"],
                "val_token_accuracy": best["val_token_accuracy"], "val_tokens": best["val_tokens"],
                **self.task.base_val}


class _LossWatch(Watch):
    """``Watch``'s loss checks without the label checks (generation predicts no label)."""

    def collapsed(self, metrics: dict[str, Any]) -> bool:
        return False


# --- shared with the gate and the benchmark ------------------------------------------------


def pad_batch(rows: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` ``[B, T]`` (T: the longest row)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        att[i, :n] = 1
        mask[i, :n] = torch.tensor(r.loss_mask, dtype=torch.bool)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "loss_mask": mask.to(device)}


def example_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per example ``[nll sum, masked tokens, correct predictions]`` (``[B, 3]``, float32) of a causal
    LM (a Hugging Face ``*ForCausalLM``, bare or wrapped by peft) on a ``pad_batch``: token t is
    predicted from the positions before it; only tokens whose ``loss_mask`` is set count, and
    only their positions go through the vocabulary projection."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    sel = batch["loss_mask"][:, 1:]
    rows = sel.nonzero()[:, 0]
    targets = batch["input_ids"][:, 1:][sel]
    logits = lm.get_output_embeddings()(hidden[:, :-1][sel]).float()
    nll = F.cross_entropy(logits, targets, reduction="none")
    correct = (logits.detach().argmax(-1) == targets).float()
    out = torch.zeros(sel.shape[0], 3, device=nll.device, dtype=torch.float32)
    ones = torch.ones_like(nll)
    return out.index_add(0, rows, torch.stack([nll, ones, correct], dim=1))


@torch.inference_mode()
def budgeted_stats(model: nn.Module, rows: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu",
                   budget: int = TOKEN_BUDGET, poll: Poll = lambda: None) -> torch.Tensor:
    """``example_stats`` of encoded ``rows`` (``[len(rows), 3]``, in their order), ``EVAL_CHUNK``
    rows padded together and run as micro-batches of at most ``budget`` padded tokens each
    (``token_budget.split``; a longer row alone), ``poll`` before each forward."""
    return torch.cat([forward_parts(lambda b: example_stats(model, b),
                                    split(pad_batch(rows[i : i + EVAL_CHUNK], pad_id, device), budget), poll)
                      for i in range(0, len(rows), EVAL_CHUNK)])


def summarise(stats: torch.Tensor) -> dict[str, Any]:
    """Validation figures from ``example_stats`` rows: token-weighted loss, its perplexity, token accuracy."""
    total = stats.double().sum(0)
    n = max(float(total[1]), 1.0)
    loss = float(total[0]) / n
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_token_accuracy": float(total[2]) / n,
            "val_tokens": int(total[1])}


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(value, int):
            return value
    return 0
