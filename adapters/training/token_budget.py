"""A token budget per training forward pass, for generation: one optimizer step's batch run as
micro-batches with gradients accumulated.

A step's batch is what the shared loop makes it (the same examples, order, batch size and
schedule); only how it goes through the model changes. ``micro_batches`` groups its rows, longest
first, so that each group's padded size (rows x its longest row) stays within the budget; a row
longer than the budget on its own is a group of one (rows are never cut). ``accumulate`` runs
each group's forward and backward in turn, so activations of one group at a time are alive, with
each group's loss the sum of its masked-token losses divided by the step's masked tokens: the
accumulated gradient is the unsplit step's (the same token-weighted mean), up to fp32 rounding.

Activation memory of a training step therefore follows the budget, not batch size x the longest
example. SmolLM2-135M in fp32 on CPU keeps ~2-3 MB per padded token: one step of 4 rows x 354
tokens peaked at 4.7 GB RSS unsplit and 2.8 GB one row per micro-batch, same loss, same step
time (1 thread; the model itself ~1.5 GB); 16 examples of 2,048 tokens unsplit would want
~100 GB. The default, 2,048 tokens (one example of the default ``max_length``), keeps a step's
activations near 5 GB on the 23 GB development machine, where the unsplit chatterbot run (8 x
349 tokens) reached 11 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

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


def accumulate(batch: dict[str, torch.Tensor], stats: Callable[[dict[str, torch.Tensor]], torch.Tensor],
               carrier: torch.Tensor, budget: int = TOKEN_BUDGET) -> torch.Tensor | None:
    """Run a right-padded ``batch`` (``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]``) as
    micro-batches within ``budget``, each trimmed to its longest row, calling ``backward`` on each
    one's ``stats(...)[:, 0].sum()`` (per-example summed loss) divided by the step's masked target
    tokens (``loss_mask[:, 1:]``). None, with nothing run, when the whole batch fits the budget.

    Otherwise returns the per-example ``stats`` rows ``[B, k]`` in the batch's row order, detached,
    plus ``0 * carrier`` (a scalar leaf that requires grad): a caller's ``backward`` of a loss
    computed from them adds nothing to the parameters' gradients, which already hold the step's.
    """
    lengths = batch["attention_mask"].sum(1).tolist()
    groups = micro_batches(lengths, budget)
    if len(groups) == 1:
        return None
    targets = batch["loss_mask"][:, 1:].sum().clamp(min=1).float()
    parts: list[torch.Tensor] = []
    for rows in groups:
        width = lengths[rows[0]]
        at = torch.tensor(rows, device=batch["input_ids"].device)
        part = stats({k: v[at, :width] for k, v in batch.items()})
        (part[:, 0].sum() / targets).backward()
        parts.append(part.detach())
    order = torch.tensor([i for rows in groups for i in rows], device=parts[0].device)
    out = torch.empty_like(torch.cat(parts))
    out[order] = torch.cat(parts)
    return out + 0.0 * carrier
