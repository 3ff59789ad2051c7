"""Width groups: how a mixed batch of rows of different widths is cut into forward passes.

A forward pass pads every row to the batch's widest, and on a CPU its cost grows with the token
slots it computes (rows x width), padding included: one 256-token review among 31 short tweets
made a MiniLM batch 4.8x dearer than the tweets alone (bench/results/length-mix-cpu.json). Cut
into a group of tweets and a group of the review, each padded to its own widest, the batch
costs about what its rows cost alone, and the long row's tenant, not its neighbours, pays for
its length.

Contract: ``width_groups(widths, forward_cost)`` -> lists of row indices (positions in
``widths``):

* the groups partition the rows: every index exactly once; each group lists its rows in
  ascending order of position, and the groups come narrowest first;
* the grouping minimises ``sum(len(group) * max(width in group)) + forward_cost * len(groups)``
  over every partition: ``forward_cost`` is what one more forward pass costs, in token slots
  (rows x width); rows are taken in order of width (a group is a run of the rows sorted by width,
  which holds every optimal grouping's cost), ties kept in position order;
* rows of equal width always share a group; ``forward_cost`` 0 gives each distinct width its
  own group, a very large one a single group; a negative cost is a ``ValueError``; an empty batch
  gives no groups;
* deterministic, and pure: ``O(n^2)`` in the rows (n is at most the engine's batch size).
"""

from __future__ import annotations

from collections.abc import Sequence


def width_groups(widths: Sequence[int], forward_cost: float) -> list[list[int]]:
    if forward_cost < 0:
        raise ValueError(f"forward_cost must be >= 0, got {forward_cost!r}")
    order = sorted(range(len(widths)), key=lambda i: (widths[i], i))
    w = [widths[i] for i in order]
    n = len(w)
    best = [0.0] + [float("inf")] * n  # best[j]: the cheapest grouping of the j narrowest rows
    cut = [0] * (n + 1)  # where the last group of that grouping starts
    for j in range(1, n + 1):
        for i in range(j):  # the last group is rows i..j-1, padded to w[j-1]
            cost = best[i] + (j - i) * w[j - 1] + forward_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]
