"""The training loop's state and how it is checkpointed: ``LoopState``.

It holds what a run has done so far -- optimizer steps, the history of validated epochs, the best
epoch (its accuracy and a copy of its trainable parameters) and, after a mid-epoch resume, the
random state to continue dropout from -- and turns it into a checkpoint (``checkpoint.save``:
trainable parameters, AdamW moments and the best epoch's parameters as tensors, keyed by
parameter name; the rest as JSON) and back. A restored state equals the saved one, so a resumed
run continues exactly where the saved one stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.training import checkpoint


class LoopState:
    def __init__(self, params: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
                 device: torch.device) -> None:
        self.params, self.opt, self.device = params, opt, device
        self.history: list[dict[str, Any]] = []
        self.best_epoch, self.best_acc = 0, -1.0
        self.best_state: dict[str, torch.Tensor] = {}
        self.step = 0
        self.resume_rng: dict[str, torch.Tensor] = {}  # random state of a mid-epoch checkpoint

    def better(self, m: dict[str, Any]) -> bool:
        """Higher validation accuracy wins; at equal accuracy a lower validation loss does, since
        a small validation set ties often and the later, better-fitted epoch should not lose."""
        if m["val_accuracy"] > self.best_acc + 1e-4:
            return True
        if self.best_epoch and abs(m["val_accuracy"] - self.best_acc) <= 1e-4:
            return bool(m["val_loss"] < self.history[self.best_epoch - 1]["val_loss"] - 1e-4)
        return False

    def keep_best(self, epoch: int, accuracy: float) -> None:
        self.best_acc, self.best_epoch = accuracy, epoch
        self.best_state = {n: p.detach().clone() for n, p in self.params}

    def load_best(self) -> None:
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(self.best_state[n])

    def set_rng(self) -> None:
        """Dropout continues where the mid-epoch checkpoint left it."""
        if "cpu" in self.resume_rng:
            torch.set_rng_state(self.resume_rng["cpu"])
        if "cuda" in self.resume_rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(self.resume_rng["cuda"], self.device)

    def save(self, folder: Path, fingerprint: str, epoch: int, bad: int, *, done: bool,
             resume_at: dict[str, Any] | None = None) -> None:
        """``epoch``: epochs completed; ``resume_at``: where inside the next one (mid-epoch)."""
        tensors: dict[str, torch.Tensor] = {}
        if resume_at is not None:
            tensors["rng.cpu"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        opt_step = 0.0
        for n, p in self.params:
            st = self.opt.state.get(p, {})
            tensors[f"param.{n}"] = p.detach()
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

    def restore(self, saved: checkpoint.Checkpoint) -> tuple[int, int]:
        """Take the saved state; returns (the epoch to start at, bad epochs so far)."""
        meta, t = saved.meta, saved.tensors
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(t[f"param.{n}"])
                if f"exp_avg.{n}" in t:
                    self.opt.state[p] = {"step": torch.tensor(meta["opt_step"]),  # AdamW keeps its step on the CPU
                                         "exp_avg": t[f"exp_avg.{n}"].to(p.device, copy=True),
                                         "exp_avg_sq": t[f"exp_avg_sq.{n}"].to(p.device, copy=True)}
                if f"best.{n}" in t:
                    self.best_state[n] = t[f"best.{n}"].to(p.device, copy=True)
        self.step, self.best_epoch, self.best_acc = meta["step"], meta["best_epoch"], meta["best_acc"]
        self.resume_rng = {k.removeprefix("rng."): v for k, v in t.items() if k.startswith("rng.")}
        self.history = meta["history"]
        return meta["epoch"] + 1, meta["bad_epochs"]
