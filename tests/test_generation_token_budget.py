"""The token budget of generation training (adapters.training.token_budget) on the tiny random
Llama: a step over the budget runs as micro-batches within it through the loop's seam
(``loop.forward_backward``), its loss and gradients are the unsplit step's (fp32), validation
forwards keep to the budget with the figures they had, and a run with a budget is still
deterministic for a seed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapters.generation.base import CausalBase, tiny_causal_base
from adapters.generation.datasets import GenerationDataset, GenerationDatasetLimits, from_records, split
from adapters.training.generation_hyperparams import GenerationHyperparameters
from adapters.training.generation_task import (
    GenerationTask, budgeted_stats, example_stats, pad_batch, resolve_generation_hyperparameters, summarise,
    train_generation,
)
from adapters.training.loop import forward_backward
from adapters.training.token_budget import micro_batches

# user turns of different lengths, so the rows of a step differ in length
WORDS = ["apple", "river " * 9, "cloud", "stone " * 4, "green", "tiger " * 14, "piano", "lemon " * 6, "candle",
         "rocket " * 11, "mirror", "forest " * 3, "shadow", "garden " * 8, "silver", "winter " * 5]
NO_DROPOUT = {"epochs": 2, "learning_rate": 0.02, "batch_size": 6, "seed": 3, "lora_dropout": 0.0}
SMALL = 96  # padded tokens: under two of the longest rows


@pytest.fixture(scope="module")
def base() -> CausalBase:
    return tiny_causal_base(0)


@pytest.fixture(scope="module")
def data() -> tuple[GenerationDataset, GenerationDataset]:
    rows = [{"messages": [{"role": "user", "content": f"Tell me about the {w.strip()}."},
                          {"role": "assistant", "content": f"It is a {w.split()[0]}."}]} for w in WORDS]
    return split(from_records(rows, limits=GenerationDatasetLimits(min_examples=5)), fraction=0.25, seed=0)


def task_for(base: CausalBase, data: Any, budget: int, **hp: Any) -> GenerationTask:
    rhp = resolve_generation_hyperparameters(GenerationHyperparameters(**{**NO_DROPOUT, **hp}), len(data[0]),
                                             "lora", base)
    task = GenerationTask(base, rhp, *data, token_budget=budget)
    torch.manual_seed(0)
    task.build()
    task.encode(lambda: None)
    return task


def test_micro_batches_group_rows_longest_first_within_the_budget() -> None:
    lengths = [5, 30, 12, 30, 7, 100, 12]
    groups = micro_batches(lengths, 64)
    assert groups == [[5], [1, 3], [2, 6, 4, 0]]  # 100 > 64 alone; 2 x 30; 4 x 12
    assert all(len(g) * max(lengths[i] for i in g) <= 64 for g in groups if len(g) > 1)
    assert micro_batches(lengths, 700) == [[5, 1, 3, 2, 6, 4, 0]]  # all fit: one group
    with pytest.raises(ValueError):
        micro_batches(lengths, 0)


def decoder_shapes(task: GenerationTask) -> tuple[list[tuple[int, int]], Any]:
    """The ``[rows, width]`` of every decoder forward of ``task``'s model, and the hook to remove."""
    seen: list[tuple[int, int]] = []
    hook = task.model.get_base_model().get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    return seen, hook


def test_a_step_over_the_budget_runs_as_micro_batches_within_it(base: CausalBase, data: Any) -> None:
    task = task_for(base, data, SMALL)
    idx = torch.arange(6)
    batch = task.train_batch(idx, 1)
    rows, width = batch["input_ids"].shape
    assert rows * width > SMALL and width <= SMALL  # over the budget, yet no row over it on its own
    parts = task.micro_batches(batch)
    assert sorted(r for p in parts for r in p.rows) == list(range(rows))
    assert sum(p.share for p in parts) == pytest.approx(1.0)
    assert [p.share for p in parts] == [int(p.batch["loss_mask"][:, 1:].sum()) / int(batch["loss_mask"][:, 1:].sum())
                                        for p in parts]
    seen, hook = decoder_shapes(task)
    try:
        task.set_training(True)
        forward_backward(task, task.objective(), idx, 1)  # the loop's step: one forward and backward a part
    finally:
        hook.remove()
    assert len(seen) == len(parts) >= 2 and sum(r for r, _ in seen) == rows
    assert all(r * w <= SMALL for r, w in seen)
    assert max(w for _, w in seen) == width  # each micro-batch trimmed to its own longest row
    whole = task_for(base, data, 1 << 20)
    assert len(whole.micro_batches(batch)) == 1 and whole.micro_batches(batch)[0].batch is batch  # fits: whole


def test_the_split_step_has_the_unsplit_steps_loss_and_gradients(base: CausalBase, data: Any) -> None:
    whole, parts = task_for(base, data, 1 << 20), task_for(base, data, SMALL)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero (A's gradient would be too): give both the same non-zero B
        for name, p in whole.model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    parts.model.load_state_dict(whole.model.state_dict())
    idx = torch.arange(6)
    lengths = whole.train_batch(idx, 1)["attention_mask"].sum(1).tolist()
    assert len(micro_batches(lengths, SMALL)) >= 2 and len(micro_batches(lengths, 1 << 20)) == 1
    losses, grads = [], []
    for task in (whole, parts):
        task.set_training(True)
        losses.append(forward_backward(task, task.objective(), idx, 1))
        grads.append({n: p.grad.clone() for n, p in task.model.named_parameters() if p.requires_grad})
    # the unsplit step's loss, computed the plain way
    plain = whole.objective().loss(whole.forward(whole.train_batch(idx, 1)), idx).item()
    assert losses[0] == pytest.approx(plain, rel=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_validation_forwards_keep_to_the_budget_and_give_the_same_figures(base: CausalBase, data: Any) -> None:
    task = task_for(base, data, SMALL)
    task.set_training(False)
    val = task._val
    assert max(len(r) for r in val) * len(val) > SMALL  # the validation set padded together is over the budget
    seen, hook = decoder_shapes(task)
    try:
        budgeted = budgeted_stats(task.model, val, task.pad_id, budget=SMALL)
    finally:
        hook.remove()
    assert len(seen) >= 2 and sum(r for r, _ in seen) == len(val)
    assert all(r * w <= SMALL or r == 1 for r, w in seen)
    with torch.inference_mode():  # what validation did before: 8 rows a forward, padded together
        before = torch.cat([example_stats(task.model, pad_batch(val[i : i + 8], task.pad_id))
                            for i in range(0, len(val), 8)])
    torch.testing.assert_close(budgeted, before, rtol=1e-5, atol=1e-5)
    assert summarise(budgeted)["val_loss"] == pytest.approx(summarise(before)["val_loss"], rel=1e-6)


def lora(result: Any) -> dict[str, torch.Tensor]:
    return {p: torch.cat([a.flatten(), b.flatten()]) for p, (a, b) in result.artifact.weights.lora.items()}


def test_a_run_with_a_budget_is_deterministic_for_a_seed_and_trains_as_unsplit(base: CausalBase, data: Any) -> None:
    hp = GenerationHyperparameters(**{**NO_DROPOUT, "lora_dropout": 0.05})
    a, b = (train_generation(base, *data, hp=hp, token_budget=SMALL) for _ in range(2))
    assert lora(a).keys() == lora(b).keys()
    assert all(torch.equal(lora(a)[k], lora(b)[k]) for k in lora(a))
    assert a.metrics["val_loss"] == b.metrics["val_loss"]
    # without dropout (whose masks follow the micro-batches' shapes) a split run trains as an unsplit one
    hp0 = GenerationHyperparameters(**NO_DROPOUT)
    split_run, whole_run = (train_generation(base, *data, hp=hp0, token_budget=n) for n in (SMALL, 1 << 20))
    assert split_run.metrics["val_loss"] == pytest.approx(whole_run.metrics["val_loss"], rel=1e-4)
    for k, w in lora(whole_run).items():  # Adam turns fp32 rounding of near-zero gradients into ~lr-sized steps
        torch.testing.assert_close(lora(split_run)[k], w, rtol=1e-3, atol=1e-4, msg=k)  # weights ~0.1
