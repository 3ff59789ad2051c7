"""The training loop every task shares: ``fit(task, hp, ...)`` trains a ``TrainingTask``.

What differs by task (the model for a method, batches, the forward pass, the data fingerprint,
the adapter) is the task's (``adapters.training.task_hooks``); everything here is the same for
text and images:

AdamW (one parameter group per ``ParamGroup``, each at its ``lr_scale`` times the schedule's
rate) with linear warmup and decay, gradient clipping at 1.0, gradient accumulation over the
parts a task splits a batch into (``task_hooks.MicroBatch``: one forward and backward per part,
one optimizer step; validation forwards split the same way), validation after every epoch,
early stopping, and the best epoch's weights restored at the end. What the loss is, what
validation measures and which epoch is best is the task's objective (``task_hooks.Objective``,
from ``task.objective()``); a task without one is a classifier (``Classification``: cross-entropy
against its label ids; validation loss, accuracy, macro-F1, confusion matrix; the best epoch
has the highest validation accuracy). Shuffling and dropout are seeded per epoch from
``seed``, so a run is deterministic on CPU and a run resumed from a checkpoint ends with the
same weights as one that never stopped.

Divergence (``divergence.Watch``: a non-finite or exploding loss, or predictions collapsed to
one label) stops training: the best healthy epoch is kept, with a warning event, if there was
one, else ``TrainingDiverged`` is raised with the reason and what to change.

A task that fits itself in closed form (an optional ``solve(poll)`` returning what to report,
e.g. the head method's L-BFGS probe) is validated once after ``encode`` and recorded as epoch
1 with no steps; predictions collapsed to one label then raise ``TrainingDiverged``. A task may
also start its weights from a closed-form fit (an optional ``warm_start(poll)``, e.g. the text
task's ``head_init`` probe) before the first step of a fresh run; its message and the validation
it starts from are an event, and a resumed run skips it (its checkpoint holds those weights).

Checkpoints (``checkpoint_dir``) are written after every epoch; a run asked to train again with
the same settings and data (``task.fingerprint()``) resumes after the last saved epoch, and a
run that had already finished (early stop included) is not trained further.

Yielding (``TrainCallbacks.should_yield``, for fair sharing of workers): asked after every
epoch's checkpoint but the last (``at_epoch_end=True``) and before every step but the first of
this run (``False``); when it answers True the run saves a checkpoint there -- mid-epoch, with
the position in the epoch, the epoch's losses so far and the random state -- and raises
``TrainingYielded``. Trained again, it resumes exactly there: the weights it ends with are the
ones an uninterrupted run ends with (CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.training import checkpoint
from adapters.training.callbacks import TrainCallbacks, TrainResult
from adapters.training.divergence import Watch
from adapters.training.errors import TrainingCancelled, TrainingDiverged, TrainingYielded
from adapters.training.loop_state import LoopState
from adapters.training.metrics import classification_metrics
from adapters.training.task_hooks import LoopSettings, MicroBatch, Objective, TrainingTask, forward_parts

EVAL_CHUNK = 64  # validation rows per batch (a task may split it: micro_batches)


def fit(task: TrainingTask, hp: LoopSettings, *, callbacks: TrainCallbacks | None = None,
        checkpoint_dir: Path | None = None, threads: int | None = None) -> TrainResult:
    """Train ``task`` with ``hp`` (see the module docstring); the result's metrics, history and
    artifact (None for ``full``) describe the best epoch."""
    cb = callbacks or TrainCallbacks()
    n_train = len(task.train_label_ids)
    t0 = time.perf_counter()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        run = _Loop(task, hp, cb)
        run.fit(checkpoint_dir)
    seconds = time.perf_counter() - t0
    planned = math.ceil(n_train / hp.batch_size) * hp.epochs
    if cb.on_step and 0 < run.state.step < planned:  # stopped early: the plan shrinks to the steps run (100%)
        cb.on_step(run.state.step, run.state.step, run.state.history[-1]["epoch"],
                   run.state.history[-1]["train_loss"])
    state = run.state
    best = state.history[state.best_epoch - 1]
    metrics = {
        "method": task.method, "labels": list(task.labels), "n_train": n_train,
        "n_validation": len(task.val_label_ids), **run.obj.result(best), "best_epoch": state.best_epoch,
        "epochs_run": len(state.history), "steps": state.step, "trainable_params": run.trainable,
        "total_params": run.total,
        "train_seconds": round(seconds, 3),
    }
    artifact = task.artifact(metrics)
    return TrainResult(artifact=artifact, model=run.model.eval(), metrics=metrics, history=state.history,
                       best_epoch=state.best_epoch, trainable_params=run.trainable, total_params=run.total,
                       seconds=seconds, hyperparameters=hp.to_dict())


class _Loop:
    def __init__(self, task: TrainingTask, hp: LoopSettings, cb: TrainCallbacks) -> None:
        self.task, self.hp, self.cb = task, hp, cb
        torch.manual_seed(hp.seed)
        self.model = task.build()
        groups = task.param_groups()
        self.params = [(n, p) for g in groups for n, p in g.params]
        self.trainable = sum(p.numel() for _, p in self.params)
        self.total = sum(p.numel() for p in self.model.parameters())
        if len(groups) == 1 and groups[0].lr_scale == 1.0:
            spec: Any = [p for _, p in groups[0].params]  # one plain group, as before groups existed
        else:
            spec = [{"params": [p for _, p in g.params], "lr_scale": g.lr_scale} for g in groups]
        self.opt = torch.optim.AdamW(spec, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        self.state = LoopState(self.params, self.opt, task.device)
        self.obj: Objective = task.objective() if hasattr(task, "objective") else Classification(task)

    def fit(self, ckpt_dir: Path | None) -> None:
        hp, task, st = self.hp, self.task, self.state
        task.encode(self._poll)
        for level, message in getattr(task, "input_notes", list)():
            self._event(level, message)
        solve = getattr(task, "solve", None)
        solved = solve(self._poll) if solve is not None else None
        if solved is not None:
            return self._solved(solved)
        ys, obj = task.train_label_ids, self.obj
        steps_per_epoch = math.ceil(len(ys) / hp.batch_size)
        total = steps_per_epoch * hp.epochs
        warmup = int(total * hp.warmup_ratio)
        watch = obj.watch(hp.epochs, hp.patience)
        fingerprint = task.fingerprint()
        start_epoch, bad_epochs = 1, 0
        resume_at: dict[str, Any] | None = None  # a mid-epoch checkpoint's place in its epoch
        saved = checkpoint.load(ckpt_dir, fingerprint)
        if saved is None:
            self._warm_start()
        else:
            start_epoch, bad_epochs = st.restore(saved)
            resume_at = saved.meta.get("resume_at")
            inside = f" and {st.step - resume_at['epoch_step']} steps of epoch {start_epoch}" if resume_at else ""
            self._event("info", f"resumed from the checkpoint after epoch {start_epoch - 1}{inside}")
            if saved.meta.get("done"):
                start_epoch = hp.epochs + 1  # it had finished (e.g. stopped early): nothing left to train
        first_step = st.step  # each run trains at least one step before it may yield
        for epoch in range(start_epoch, hp.epochs + 1):
            torch.manual_seed(hp.seed * 100_003 + epoch)  # dropout and order depend on (seed, epoch) only
            order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(hp.seed * 7919 + epoch))
            first = st.history[0]["train_loss"] if st.history else None
            task.set_training(True)
            losses: list[float] = []
            begin, epoch_step = 0, st.step
            if resume_at is not None and resume_at["epoch"] == epoch:
                begin, epoch_step, losses = resume_at["position"], resume_at["epoch_step"], list(resume_at["losses"])
                st.set_rng()
            resume_at = None
            for i in range(begin, len(ys), hp.batch_size):
                self._poll()
                if st.step > first_step and ckpt_dir is not None and self._wants_yield(False):
                    self._save(ckpt_dir, fingerprint, epoch - 1, bad_epochs, done=False, resume_at={
                        "epoch": epoch, "position": i, "epoch_step": epoch_step, "losses": losses})
                    raise TrainingYielded(epoch, st.step, mid_epoch=True)
                idx = order[i : i + hp.batch_size].to(task.device)
                lr = hp.learning_rate * _schedule(st.step, warmup, total)
                for group in self.opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                losses.append(forward_backward(task, obj, idx, epoch))
                why = watch.step(losses, first)
                if why:  # checked before the update: a NaN never reaches the weights
                    self.opt.zero_grad(set_to_none=True)
                    return self._diverged(f"{why} (step {st.step + 1})")
                torch.nn.utils.clip_grad_norm_([p for _, p in self.params], 1.0)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                st.step += 1
                if self.cb.on_step and (st.step % 10 == 0 or st.step == total):
                    self.cb.on_step(st.step, total, epoch, sum(losses[-10:]) / len(losses[-10:]))
            train_loss = sum(losses) / len(losses)
            metrics = {"epoch": epoch, "step": st.step, "train_loss": train_loss, **self._evaluate()}
            metrics["collapsed"] = watch.collapsed(metrics)
            st.history.append(metrics)
            if self.cb.on_epoch:
                self.cb.on_epoch(epoch, dict(metrics))
            self._event("info", f"epoch {epoch}/{hp.epochs}: train loss {train_loss:.4f}, val loss "
                                f"{metrics['val_loss']:.4f}, {obj.describe(metrics)}"
                                + (" (one label for everything)" if metrics["collapsed"] else ""))
            why = watch.epoch(st.history, st.best_epoch)
            if why:
                return self._diverged(why)
            if not metrics["collapsed"] and obj.better(metrics, st):
                st.keep_best(epoch, metrics.get("val_accuracy", 0.0))  # (the accuracy only Classification reads)
                bad_epochs = 0
            else:
                bad_epochs += 1
            # patience runs only once a healthy epoch exists: slow starts get every epoch
            stop = bool(st.best_epoch) and bad_epochs >= hp.patience and epoch < hp.epochs
            if ckpt_dir is not None:
                self._save(ckpt_dir, fingerprint, epoch, bad_epochs, done=stop or epoch == hp.epochs)
            if stop:
                self._event("info", f"early stop: no better {obj.criterion} for {bad_epochs} epochs")
                break
            if ckpt_dir is not None and epoch < hp.epochs and self._wants_yield(True):
                raise TrainingYielded(epoch + 1, st.step, mid_epoch=False)
        if st.best_epoch == 0:
            raise watch.never_healthy(st.history, steps_per_epoch, hp.learning_rate)
        st.load_best()

    def _warm_start(self) -> None:
        """The task's optional ``warm_start(poll)``, on a fresh run only (a resumed run's
        checkpoint holds the weights it set), reported with the validation it starts from."""
        warm = getattr(self.task, "warm_start", None)
        info = warm(self._poll) if warm is not None else None
        if info is not None:
            self._event(info.get("level", "info"), f"{info['message']}; before training: "
                                                   f"{self.obj.describe(self._evaluate())}")

    def _solved(self, info: dict[str, Any]) -> None:
        """A task that fitted itself in closed form (``solve``): validated once, as epoch 1 of 1
        with no optimizer steps; no checkpoint (a run started again fits again)."""
        st, obj = self.state, self.obj
        metrics = {"epoch": 1, "step": 0, "train_loss": info["train_loss"], **self._evaluate(),
                   **{k: v for k, v in info.items() if k not in ("train_loss", "message")}}
        metrics["collapsed"] = obj.watch(1, 1).collapsed(metrics)
        st.history.append(metrics)
        self._event("info", info["message"])
        if self.cb.on_step:
            self.cb.on_step(1, 1, 1, info["train_loss"])
        if self.cb.on_epoch:
            self.cb.on_epoch(1, dict(metrics))
        self._event("info", f"validation: {obj.describe(metrics)}")
        if metrics["collapsed"]:
            raise TrainingDiverged("the fitted head predicts one label for every validation example: these "
                                   "features do not separate the labels; try method lora")
        st.keep_best(1, metrics.get("val_accuracy", 0.0))

    def _poll(self) -> None:
        if self.cb.should_stop and self.cb.should_stop():
            raise TrainingCancelled("training cancelled")

    def _wants_yield(self, at_epoch_end: bool) -> bool:
        return bool(self.cb.should_yield and self.cb.should_yield(at_epoch_end))

    def _diverged(self, why: str) -> None:
        if self.state.best_epoch == 0:
            raise TrainingDiverged(f"training diverged: {why}; try a lower learning_rate "
                                   f"(this run used {self.hp.learning_rate:g})")
        self._event("warning", f"stopped early: {why}; keeping epoch {self.state.best_epoch}")
        self.state.load_best()

    def _save(self, folder: Path, fingerprint: str, epoch: int, bad: int, *, done: bool,
              resume_at: dict[str, Any] | None = None) -> None:
        self.state.save(folder, fingerprint, epoch, bad, done=done, resume_at=resume_at)
        if self.cb.on_checkpoint:
            self.cb.on_checkpoint(folder)

    @torch.inference_mode()
    def _evaluate(self) -> dict[str, Any]:
        task = self.task
        task.set_training(False)
        chunks, n = [], len(task.val_label_ids)
        for i in range(0, n, EVAL_CHUNK):
            idx = torch.arange(i, min(i + EVAL_CHUNK, n), device=task.device)
            chunks.append(forward_parts(task.forward, parts(task, task.val_batch(idx), len(idx)), self._poll))
        return self.obj.evaluate(chunks)

    def _event(self, level: str, message: str) -> None:
        if self.cb.on_event:
            self.cb.on_event(level, message)


def forward_backward(task: TrainingTask, obj: Objective, idx: torch.Tensor, epoch: int) -> float:
    """The loss of a training step over examples ``idx`` (``task.train_batch(idx, epoch)``), its
    gradient accumulated in the parameters: one forward and backward per part of the batch
    (``parts``), each part's loss weighted by its share, so a split step's gradient is the whole
    batch's (up to rounding). The optimizer step is the caller's."""
    total = 0.0
    for part in parts(task, task.train_batch(idx, epoch), len(idx)):
        loss = obj.loss(task.forward(part.batch), idx[torch.tensor(part.rows, device=idx.device)]) * part.share
        loss.backward()
        total += loss.item()
    return total


def parts(task: TrainingTask, batch: Any, n: int) -> list[MicroBatch]:
    """The task's parts of ``batch`` of ``n`` rows (``micro_batches``, when it has one), or the batch whole."""
    split = getattr(task, "micro_batches", None)
    return split(batch) if split is not None else [MicroBatch(batch, list(range(n)), 1.0)]


class Classification:
    """The objective of a task without one of its own (``task_hooks.Objective``): cross-entropy of
    ``forward``'s logits against the task's label ids; validation loss, accuracy, macro-F1 and the
    confusion matrix; the best epoch has the highest accuracy (``LoopState.better``); predictions
    collapsed to one label are watched for (``divergence.Watch``)."""

    criterion = "validation accuracy"

    def __init__(self, task: TrainingTask) -> None:
        self.ys, self.vys, self.n_labels = task.train_label_ids, task.val_label_ids, len(task.labels)
        self.y = torch.tensor(self.ys, device=task.device)
        self.vy = torch.tensor(self.vys, device=task.device)

    def watch(self, epochs: int, patience: int) -> Watch:
        return Watch.for_data(self.ys, self.vys, epochs, patience)

    def loss(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, self.y[idx])

    def evaluate(self, outputs: list[torch.Tensor]) -> dict[str, Any]:
        logits = torch.cat(outputs)
        preds = logits.argmax(-1)
        m = classification_metrics(self.vys, preds.tolist(), self.n_labels)
        return {"val_loss": F.cross_entropy(logits.float(), self.vy).item(), "val_accuracy": m["accuracy"],
                "val_macro_f1": m["macro_f1"], "confusion_matrix": m["confusion_matrix"],
                "distinct_predictions": len(set(preds.tolist()))}

    def better(self, metrics: dict[str, Any], state: LoopState) -> bool:
        return state.better(metrics)

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"val accuracy {metrics['val_accuracy']:.4f}"

    def result(self, best: dict[str, Any]) -> dict[str, Any]:
        return {"val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
                "val_loss": best["val_loss"], "confusion_matrix": best["confusion_matrix"]}


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
