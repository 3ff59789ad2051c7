"""Fine-tune one tenant's adapter on the frozen shared base.

``train`` never touches ``base.model``: it deep-copies it, gives the copy a fresh head for the
tenant's labels and trains one of three ways:

* ``lora`` -- peft LoRA on the chosen linear layers plus the head (the product path);
* ``head`` -- the head alone on frozen features, computed once through a forward hook on the
  head (the feature-extraction baseline); the artifact format needs a LoRA pair, so its
  artifact carries a rank-1 pair with B = 0 -- an exact no-op -- on the first linear layer;
* ``full`` -- every weight (the quality anchor for benchmarks; it produces no adapter).

The head reads the base's pooling (``base.spec.pooling``, from its own configuration: see
``adapters.pooling``) in every method, and the artifact's manifest records it, so the engine
serves the adapter with the features it was trained on; ``TrainResult.model`` keeps it too.

AdamW with linear warmup and decay, gradient clipping at 1.0, validation after every epoch
(loss, accuracy, macro-F1, confusion matrix), early stopping on validation accuracy, and the
best epoch's weights restored at the end. Shuffling and dropout are seeded per epoch from
``seed``, so a run is deterministic on CPU and a run resumed from a checkpoint ends with the
same weights as one that never stopped.

Divergence (``divergence.Watch``: a non-finite or exploding loss, or predictions collapsed to
one label) stops training: the best healthy epoch is kept, with a warning event, if there was
one, else ``TrainingDiverged`` is raised with the reason and what to change.

Checkpoints (``checkpoint_dir``) are written after every epoch; a run asked to train again with
the same settings and data resumes after the last saved epoch, and a run that had already
finished (early stop included) is not trained further.

Yielding (``TrainCallbacks.should_yield``, for fair sharing of workers): asked after every
epoch's checkpoint but the last (``at_epoch_end=True``) and before every step but the first of
this run (``False``); when it answers True the run saves a checkpoint there -- mid-epoch, with
the position in the epoch, the epoch's losses so far and the random state -- and raises
``TrainingYielded``. Trained again, it resumes exactly there: the weights it ends with are the
ones an uninterrupted run ends with (CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import operator
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from adapters.artifact import AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings
from adapters.base import BaseModel
from adapters.errors import DatasetError
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, import_peft
from adapters.pooling import POOLER, attach
from adapters.training import checkpoint
from adapters.training.hyperparams import HyperparameterError, Hyperparameters, ResolvedHyperparameters
from adapters.training.divergence import Watch
from adapters.training.errors import TrainingCancelled, TrainingDiverged
from adapters.training.metrics import classification_metrics

METHODS = ("lora", "head", "full")
__all__ = ["METHODS", "TrainCallbacks", "TrainResult", "TrainingCancelled", "TrainingDiverged", "TrainingYielded",
           "train"]


class TrainingYielded(Exception):
    """``should_yield`` said yes: a checkpoint is saved; training again resumes at ``epoch``
    after ``step`` optimizer steps (``mid_epoch``: inside that epoch, else at its start)."""

    def __init__(self, epoch: int, step: int, mid_epoch: bool) -> None:
        where = f"step {step}, inside epoch {epoch}" if mid_epoch else f"the start of epoch {epoch}"
        super().__init__(f"training yielded; it resumes at {where}")
        self.epoch, self.step, self.mid_epoch = epoch, step, mid_epoch


@dataclass
class TrainCallbacks:
    on_step: Callable[[int, int, int, float], None] | None = None  # step, total, epoch, loss
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_event: Callable[[str, str], None] | None = None  # level, message
    on_checkpoint: Callable[[Path], None] | None = None  # after each checkpoint is saved
    # give the worker back now? (argument: at an epoch end); see "Yielding" above
    should_yield: Callable[[bool], bool] | None = None


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


def train(
    base: BaseModel, train_texts: list[str], train_label_ids: list[int], labels: tuple[str, ...],
    val_texts: list[str], val_label_ids: list[int], *, method: str = "lora",
    hp: Hyperparameters | ResolvedHyperparameters | None = None, callbacks: TrainCallbacks | None = None,
    checkpoint_dir: Path | None = None, threads: int | None = None,
) -> TrainResult:
    if method not in METHODS:
        raise HyperparameterError(f"method must be one of {', '.join(METHODS)}, got {method!r}", param="method")
    labels = tuple(labels)
    _check_data(labels, train_texts, train_label_ids, "training")
    _check_data(labels, val_texts, val_label_ids, "validation")
    train_label_ids, val_label_ids = [int(i) for i in train_label_ids], [int(i) for i in val_label_ids]
    rhp = hp if isinstance(hp, ResolvedHyperparameters) else (hp or Hyperparameters()).resolve(
        len(train_texts), method, base.device)
    max_pos = getattr(getattr(base.model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and rhp.max_length > max_pos:
        raise HyperparameterError(f"max_length {rhp.max_length} exceeds the base model's {max_pos} positions",
                                  param="hyperparameters.max_length")
    cb = callbacks or TrainCallbacks()
    t0 = time.perf_counter()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        run = _Run(base, labels, method, rhp, cb)
        run.fit(train_texts, train_label_ids, val_texts, val_label_ids, checkpoint_dir)
    seconds = time.perf_counter() - t0
    planned = math.ceil(len(train_texts) / rhp.batch_size) * rhp.epochs
    if cb.on_step and 0 < run.step < planned:  # stopped early: the plan shrinks to the steps run (100%)
        cb.on_step(run.step, run.step, run.history[-1]["epoch"], run.history[-1]["train_loss"])
    best = run.history[run.best_epoch - 1]
    metrics = {
        "method": method, "labels": list(labels), "n_train": len(train_texts), "n_validation": len(val_texts),
        "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"], "val_loss": best["val_loss"],
        "confusion_matrix": best["confusion_matrix"], "best_epoch": run.best_epoch, "epochs_run": len(run.history),
        "trainable_params": run.trainable, "total_params": run.total, "train_seconds": round(seconds, 3),
    }
    artifact = None if method == "full" else run.artifact(metrics)
    return TrainResult(artifact=artifact, model=run.model.eval(), metrics=metrics, history=run.history,
                       best_epoch=run.best_epoch, trainable_params=run.trainable, total_params=run.total,
                       seconds=seconds, hyperparameters=rhp.to_dict())


class _Run:
    def __init__(self, base: BaseModel, labels: tuple[str, ...], method: str, hp: ResolvedHyperparameters,
                 cb: TrainCallbacks) -> None:
        self.base, self.labels, self.method, self.hp, self.cb = base, labels, method, hp, cb
        self.device, self.pooling = base.device, base.spec.pooling
        torch.manual_seed(hp.seed)
        model = hf = copy.deepcopy(base.model).float()
        setattr(model, base.head_name, nn.Linear(base.spec.head_in_features, len(labels)))
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            check_targets(base, hp.target_modules)

            for p in model.parameters():
                p.requires_grad_(False)
            cfg = LoraConfig(task_type="SEQ_CLS", r=hp.lora_r, lora_alpha=hp.lora_alpha,
                             lora_dropout=hp.lora_dropout, target_modules=list(hp.target_modules),
                             modules_to_save=[base.head_name])
            model = get_peft_model(model, cfg)
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(method == "full" or name.startswith(base.head_name + "."))
        attach(hf, base.head_name, self.pooling)  # after peft: the head is then peft's wrapper
        self.model = model.to(self.device)
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for _, p in self.params)
        self.total = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW([p for _, p in self.params], lr=hp.learning_rate,
                                     weight_decay=hp.weight_decay)
        self.history: list[dict[str, Any]] = []
        self.best_epoch, self.best_acc = 0, -1.0
        self.best_state: dict[str, torch.Tensor] = {}
        self.step = 0
        self.resume_rng: dict[str, torch.Tensor] = {}  # random state of a mid-epoch checkpoint

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, xs: list[str], ys: list[int], vxs: list[str], vys: list[int], ckpt_dir: Path | None) -> None:
        hp = self.hp
        train_in, val_in = self._inputs(xs), self._inputs(vxs)
        y, vy = torch.tensor(ys, device=self.device), torch.tensor(vys, device=self.device)
        steps_per_epoch = math.ceil(len(xs) / hp.batch_size)
        total = steps_per_epoch * hp.epochs
        warmup = int(total * hp.warmup_ratio)
        watch = Watch.for_data(ys, vys, hp.epochs, hp.patience)
        fingerprint = self._fingerprint(xs, ys, vxs, vys)
        start_epoch, bad_epochs = 1, 0
        resume_at: dict[str, Any] | None = None  # a mid-epoch checkpoint's place in its epoch
        state = checkpoint.load(ckpt_dir, fingerprint)
        if state is not None:
            start_epoch, bad_epochs = self._restore(state)
            resume_at = state.meta.get("resume_at")
            inside = f" and {self.step - resume_at['epoch_step']} steps of epoch {start_epoch}" if resume_at else ""
            self._event("info", f"resumed from the checkpoint after epoch {start_epoch - 1}{inside}")
            if state.meta.get("done"):
                start_epoch = hp.epochs + 1  # it had finished (e.g. stopped early): nothing left to train
        first_step = self.step  # each run trains at least one step before it may yield
        for epoch in range(start_epoch, hp.epochs + 1):
            torch.manual_seed(hp.seed * 100_003 + epoch)  # dropout and order depend on (seed, epoch) only
            order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(hp.seed * 7919 + epoch))
            first = self.history[0]["train_loss"] if self.history else None
            self.model.train()
            losses: list[float] = []
            begin, epoch_step = 0, self.step
            if resume_at is not None and resume_at["epoch"] == epoch:
                begin, epoch_step, losses = resume_at["position"], resume_at["epoch_step"], list(resume_at["losses"])
                self._set_rng()
            resume_at = None
            for i in range(begin, len(xs), hp.batch_size):
                self._poll()
                if self.step > first_step and ckpt_dir is not None and self._wants_yield(False):
                    self._save(ckpt_dir, fingerprint, epoch - 1, bad_epochs, done=False, resume_at={
                        "epoch": epoch, "position": i, "epoch_step": epoch_step, "losses": losses})
                    if self.cb.on_checkpoint:
                        self.cb.on_checkpoint(ckpt_dir)
                    raise TrainingYielded(epoch, self.step, mid_epoch=True)
                idx = order[i : i + hp.batch_size].to(self.device)
                lr = hp.learning_rate * _schedule(self.step, warmup, total)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                loss = F.cross_entropy(self._logits(train_in, idx), y[idx])
                losses.append(loss.item())
                why = watch.step(losses, first)
                if why:  # checked before the update: a NaN never reaches the weights
                    return self._diverged(f"{why} (step {self.step + 1})")
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in self.params], 1.0)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                if self.cb.on_step and (self.step % 10 == 0 or self.step == total):
                    self.cb.on_step(self.step, total, epoch, sum(losses[-10:]) / len(losses[-10:]))
            train_loss = sum(losses) / len(losses)
            metrics = {"epoch": epoch, "step": self.step, "train_loss": train_loss, **self._evaluate(val_in, vy)}
            metrics["collapsed"] = watch.collapsed(metrics)
            self.history.append(metrics)
            if self.cb.on_epoch:
                self.cb.on_epoch(epoch, dict(metrics))
            self._event("info", f"epoch {epoch}/{hp.epochs}: train loss {train_loss:.4f}, val loss "
                                f"{metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.4f}"
                                + (" (one label for everything)" if metrics["collapsed"] else ""))
            why = watch.epoch(self.history, self.best_epoch)
            if why:
                return self._diverged(why)
            if not metrics["collapsed"] and self._better(metrics):
                self.best_acc, self.best_epoch, bad_epochs = metrics["val_accuracy"], epoch, 0
                self.best_state = {n: p.detach().clone() for n, p in self.params}
            else:
                bad_epochs += 1
            # patience runs only once a healthy epoch exists: slow starts get every epoch
            stop = bool(self.best_epoch) and bad_epochs >= hp.patience and epoch < hp.epochs
            if ckpt_dir is not None:
                self._save(ckpt_dir, fingerprint, epoch, bad_epochs, done=stop or epoch == hp.epochs)
                if self.cb.on_checkpoint:
                    self.cb.on_checkpoint(ckpt_dir)
            if stop:
                self._event("info", f"early stop: no better validation accuracy for {bad_epochs} epochs")
                break
            if ckpt_dir is not None and epoch < hp.epochs and self._wants_yield(True):
                raise TrainingYielded(epoch + 1, self.step, mid_epoch=False)
        if self.best_epoch == 0:
            raise watch.never_healthy(self.history, steps_per_epoch, hp.learning_rate)
        self._load_best()

    def _better(self, m: dict[str, Any]) -> bool:
        """Higher validation accuracy wins; at equal accuracy a lower validation loss does, since
        a small validation set ties often and the later, better-fitted epoch should not lose."""
        if m["val_accuracy"] > self.best_acc + 1e-4:
            return True
        if self.best_epoch and abs(m["val_accuracy"] - self.best_acc) <= 1e-4:
            return bool(m["val_loss"] < self.history[self.best_epoch - 1]["val_loss"] - 1e-4)
        return False

    def _poll(self) -> None:
        if self.cb.should_stop and self.cb.should_stop():
            raise TrainingCancelled("training cancelled")

    def _wants_yield(self, at_epoch_end: bool) -> bool:
        return bool(self.cb.should_yield and self.cb.should_yield(at_epoch_end))

    def _set_rng(self) -> None:
        """Dropout continues where the mid-epoch checkpoint left it."""
        if "cpu" in self.resume_rng:
            torch.set_rng_state(self.resume_rng["cpu"])
        if "cuda" in self.resume_rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(self.resume_rng["cuda"], self.device)

    def _diverged(self, why: str) -> None:
        if self.best_epoch == 0:
            raise TrainingDiverged(f"training diverged: {why}; try a lower learning_rate "
                                   f"(this run used {self.hp.learning_rate:g})")
        self._event("warning", f"stopped early: {why}; keeping epoch {self.best_epoch}")
        self._load_best()

    # -- pieces -----------------------------------------------------------------------------

    def _inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.base.tokenize(texts, max_length=self.hp.max_length)
        if self.method != "head":
            return enc
        # head-only: the frozen features the head reads, computed once
        feats: list[torch.Tensor] = []
        head = getattr(self.model, self.base.head_name)
        hook = head.register_forward_hook(lambda mod, args, out: feats.append(args[0].detach()))
        self.model.eval()
        try:
            with torch.inference_mode():
                for i in range(0, len(texts), 64):
                    self._poll()
                    self.model(**{k: v[i : i + 64] for k, v in enc.items()})
        finally:
            hook.remove()
        return {"features": torch.cat(feats).clone()}

    def _logits(self, inputs: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        if self.method == "head":
            return getattr(self.model, self.base.head_name)(inputs["features"][idx])
        batch = {k: v[idx] for k, v in inputs.items()}
        if "attention_mask" in batch:  # trim the padding this batch does not need
            width = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :width] for k, v in batch.items()}
        return self.model(**batch).logits

    @torch.inference_mode()
    def _evaluate(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
        self.model.eval()
        chunks = []
        for i in range(0, len(y), 64):
            self._poll()
            chunks.append(self._logits(inputs, torch.arange(i, min(i + 64, len(y)), device=self.device)))
        logits = torch.cat(chunks)
        preds = logits.argmax(-1)
        m = classification_metrics(y.tolist(), preds.tolist(), len(self.labels))
        return {"val_loss": F.cross_entropy(logits.float(), y).item(), "val_accuracy": m["accuracy"],
                "val_macro_f1": m["macro_f1"], "confusion_matrix": m["confusion_matrix"],
                "distinct_predictions": len(set(preds.tolist()))}

    def _load_best(self) -> None:
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(self.best_state[n])

    def _event(self, level: str, message: str) -> None:
        if self.cb.on_event:
            self.cb.on_event(level, message)

    def _fingerprint(self, xs: list[str], ys: list[int], vxs: list[str], vys: list[int]) -> str:
        """What a checkpoint must match to be resumed: method, labels, settings, base and data."""
        what = [self.method, list(self.labels), self.hp.to_dict(), self.base.spec.fingerprint]
        if self.pooling != POOLER:  # (pooler runs keep the checkpoints they had before pooling was recorded)
            what.append(self.pooling.to_dict())
        h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
        for part in (xs, ys, vxs, vys):
            h.update(json.dumps(part).encode())
        return h.hexdigest()

    def _save(self, folder: Path, fingerprint: str, epoch: int, bad: int, *, done: bool,
              resume_at: dict[str, Any] | None = None) -> None:
        """``epoch``: epochs completed; ``resume_at``: where inside the next one (mid-epoch)."""
        tensors: dict[str, torch.Tensor] = {}
        if resume_at is not None:
            tensors["rng.cpu"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        opt_step = 0.0
        for i, (n, p) in enumerate(self.params):
            tensors[f"param.{n}"] = p.detach()
            st = self.opt.state.get(p, {})
            if st:
                tensors[f"exp_avg.{n}"], tensors[f"exp_avg_sq.{n}"] = st["exp_avg"], st["exp_avg_sq"]
                opt_step = float(st["step"])
            if n in self.best_state:
                tensors[f"best.{n}"] = self.best_state[n]
        meta = {"fingerprint": fingerprint, "epoch": epoch, "step": self.step, "opt_step": opt_step,
                "best_epoch": self.best_epoch, "best_acc": self.best_acc, "bad_epochs": bad,
                "done": done, "history": self.history}
        if resume_at is not None:
            meta["resume_at"] = resume_at
        checkpoint.save(folder, meta, tensors)

    def _restore(self, state: checkpoint.Checkpoint) -> tuple[int, int]:
        meta, t = state.meta, state.tensors
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(t[f"param.{n}"])
                if f"exp_avg.{n}" in t:
                    self.opt.state[p] = {"step": torch.tensor(meta["opt_step"]), "exp_avg": t[f"exp_avg.{n}"].clone(),
                                         "exp_avg_sq": t[f"exp_avg_sq.{n}"].clone()}
                if f"best.{n}" in t:
                    self.best_state[n] = t[f"best.{n}"].clone()
        self.step, self.best_epoch, self.best_acc = meta["step"], meta["best_epoch"], meta["best_acc"]
        self.resume_rng = {k.removeprefix("rng."): v for k, v in t.items() if k.startswith("rng.")}
        self.history = meta["history"]
        return meta["epoch"] + 1, meta["bad_epochs"]

    # -- the adapter ------------------------------------------------------------------------

    def artifact(self, metrics: dict[str, Any]) -> AdapterArtifact:
        spec = self.base.spec
        if self.method == "lora":
            with tempfile.TemporaryDirectory(prefix="tailor-train-") as tmp:
                self.model.save_pretrained(tmp)
                files = {name: (Path(tmp) / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
            art = import_peft(files, spec, labels=list(self.labels), metrics=metrics)
            return replace(art, manifest=replace(art.manifest, pooling=self.pooling))
        # head-only: our format needs one LoRA pair, so it carries a rank-1 pair with B = 0, an
        # exact no-op on the base, on the first adaptable layer
        head: nn.Linear = getattr(self.model, self.base.head_name)
        path = next(p for p in spec.linear_shapes if p != spec.head_name)
        d_in, d_out = spec.linear_shapes[path]
        weights = AdapterWeights(lora={path: (torch.zeros(1, d_in), torch.zeros(d_out, 1))},
                                 head_weight=head.weight.detach().cpu().clone(),
                                 head_bias=head.bias.detach().cpu().clone())
        manifest = AdapterManifest(
            base_fingerprint=spec.fingerprint, labels=self.labels,
            lora=LoraSettings(r=1, alpha=1.0, target_modules=(path.rsplit(".", 1)[-1],)),
            head_in_features=spec.head_in_features, metrics=metrics, source="tailor-head", pooling=self.pooling,
        )
        art = AdapterArtifact(manifest=manifest, weights=weights)
        art.validate()
        return art


def check_targets(base: BaseModel, targets: tuple[str, ...] | list[str]) -> None:
    """Every LoRA target must name linear layers of the base (peft's suffix matching)."""
    for target in targets:
        if not base.spec.match_target(target):
            names = sorted({p.rsplit(".", 1)[-1] for p in base.spec.linear_shapes if p != base.spec.head_name})
            raise HyperparameterError(
                f"target module {target!r} matches no linear layer of the base model; "
                f"try one of: {', '.join(names)}", param="hyperparameters.target_modules")


def _check_data(labels: tuple[str, ...], texts: list[str], ids: list[int], which: str) -> None:
    if len(labels) < 2:
        raise DatasetError(f"a classifier needs at least 2 labels, got {len(labels)}", param="labels")
    if not texts:
        raise DatasetError(f"the {which} set is empty", param=which)
    if len(texts) != len(ids):
        raise DatasetError(f"the {which} set has {len(texts)} texts but {len(ids)} label ids", param=which)
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


def _schedule(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
