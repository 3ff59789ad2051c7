"""A token budget per forward pass, for generation: one optimizer step's batch (or a chunk of
validation rows) goes through the model as micro-batches within it.

A step's batch is what the shared loop makes it (the same examples, order, batch size and
schedule); only how it goes through the model changes. ``micro_batches`` groups its rows, longest
first, so that each group's padded size (rows x its longest row) stays within the budget; a row
longer than the budget on its own is a group of one (rows are never cut). ``split`` turns a
right-padded batch into those groups as ``task_hooks.MicroBatch``es, each trimmed to its longest
row, each one's share of the step's loss its masked target tokens over the step's: the loop
(``adapters.training.loop``) runs each one's forward and backward in turn, so activations of one
group at a time are alive, and the accumulated gradient is the unsplit step's (the same
token-weighted mean), up to fp32 rounding. Validation forwards split the same way.

Activation memory of a training step therefore follows the budget, not batch size x the longest
example. SmolLM2-135M in fp32 on CPU keeps ~2-3 MB per padded token: one step of 4 rows x 354
tokens peaked at 4.7 GB RSS unsplit and 2.8 GB one row per micro-batch, same loss, same step
time (1 thread; the model itself ~1.5 GB); 16 examples of 2,048 tokens unsplit would want
~100 GB. The default, 2,048 tokens (one example of the default ``max_length``), keeps a step's
activations near 5 GB on the 23 GB development machine, where the unsplit chatterbot run (8 x
349 tokens) reached 11 GB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapters.training.task_hooks import MicroBatch

TOKEN_BUDGET = 2048  # padded tokens (rows x longest row) per training forward pass


def micro_batches(lengths: Sequence[int], budget: int = TOKEN_BUDGET) -> list[list[int]]:
    """Row indices of ``lengths`` in groups, longest rows first (ties in row order), each group's
    ``len(group) * max(its lengths)`` at most ``budget`` unless it is one row longer than that.
    Every row is in exactly one group; one group holds them all when they fit together."""
    if budget < 1:
        raise ValueError(f"the token budget must be positive, got {budget}")
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        # sorted longest first: a group's width is its first row's length
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def split(batch: dict[str, torch.Tensor], budget: int = TOKEN_BUDGET) -> list[MicroBatch]:
    """A right-padded ``batch`` (``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]``) as
    micro-batches within ``budget`` (``micro_batches``), each trimmed to its longest row, with its
    share of the step's masked target tokens (``loss_mask[:, 1:]``). The batch itself, whole, when
    it fits the budget."""
    lengths = batch["attention_mask"].sum(1).tolist()
    groups = micro_batches(lengths, budget)
    if len(groups) == 1:
        return [MicroBatch(batch, list(range(len(lengths))), 1.0)]
    targets = max(int(batch["loss_mask"][:, 1:].sum()), 1)
    parts = []
    for rows in groups:
        at = torch.tensor(rows, device=batch["input_ids"].device)
        part = {k: v[at, : lengths[rows[0]]] for k, v in batch.items()}
        parts.append(MicroBatch(part, rows, int(part["loss_mask"][:, 1:].sum()) / targets))
    return parts
