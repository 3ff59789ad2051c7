"""Gradient accumulation is a seam of the shared loop (``loop.forward_backward``, ``loop.parts``,
``task_hooks.forward_parts``), not of one task: a text classifier whose ``micro_batches`` splits
every batch into parts, in another row order, gets the unsplit step's loss and gradients (fp32)
and the unsplit validation logits, each row with its own label."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapters.base import tiny_base
from adapters.training import Hyperparameters
from adapters.training.loop import forward_backward, parts
from adapters.training.task_hooks import MicroBatch, forward_parts
from adapters.training.text_task import TextTask
from tests.training_data import FAST_HP, sentiment

LABELS = ("neg", "pos")


class SplitTextTask(TextTask):
    """A text task that runs every batch as three parts, last rows first."""

    def micro_batches(self, batch: dict[str, torch.Tensor]) -> list[MicroBatch]:
        n = batch["input_ids"].shape[0]
        order = list(range(n))[::-1]
        groups = [order[i : i + (n + 2) // 3] for i in range(0, n, (n + 2) // 3)]
        return [MicroBatch({k: v[g] for k, v in batch.items()}, g, len(g) / n) for g in groups]


def task(cls: type[TextTask], base: Any) -> TextTask:
    tr, va = sentiment(32, seed=0), sentiment(12, seed=1)
    ids = {name: i for i, name in enumerate(LABELS)}
    rhp = Hyperparameters.from_dict({**FAST_HP, "lora_dropout": 0.0}).resolve(len(tr), "lora")
    t = cls(base, LABELS, "lora", rhp, [r["text"] for r in tr], [ids[r["label"]] for r in tr],
            [r["text"] for r in va], [ids[r["label"]] for r in va])
    torch.manual_seed(0)
    t.build()
    t.encode(lambda: None)
    return t


def test_a_task_that_splits_its_batches_trains_and_validates_as_the_unsplit_one() -> None:
    from adapters.training.loop import Classification

    base = tiny_base(seed=1, initializer_range=0.3)
    whole, split = task(TextTask, base), task(SplitTextTask, base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: give both the same non-zero weights
        for p in whole.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    split.model.load_state_dict(whole.model.state_dict())
    idx = torch.tensor([3, 0, 7, 12, 5, 9, 30, 1])
    assert len(parts(split, split.train_batch(idx, 1), len(idx))) == 3
    assert len(parts(whole, whole.train_batch(idx, 1), len(idx))) == 1
    losses, grads = [], []
    for t in (whole, split):
        t.set_training(False)  # the base's own dropout off: both steps see the same function
        losses.append(forward_backward(t, Classification(t), idx, 1))
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # validation: the parts' logits come back in the batch's row order
    vidx = torch.arange(12)
    with torch.inference_mode():
        ref = whole.forward(whole.val_batch(vidx))
        got = forward_parts(split.forward, parts(split, split.val_batch(vidx), 12), lambda: None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
