"""Width groups: how a mixed batch of rows of different widths is cut into forward passes.

A forward pass pads every row to the batch's widest, and on a CPU its cost grows with the token
slots it computes (rows x width), padding included: one 256-token review among 31 short tweets
made a MiniLM batch 4.9x dearer than the tweets alone; cut into passes of similar width, each
padded to its own widest, it cost 0.84x (the tweets themselves vary: bench/results/
length-mix-cpu.json), and the long row's tenant, not its neighbours, pays for its length.

Contract: ``width_groups(widths, forward_cost)`` -> lists of row indices (positions in
``widths``):

* the groups partition the rows: every index exactly once; each group lists its rows in
  ascending order of position, and the groups come narrowest first;
* the grouping minimises ``sum(len(group) * max(width in group)) + forward_cost * len(groups)``
  over every partition: ``forward_cost`` is what one more forward pass costs, in token slots
  (rows x width); a group is a run of the widths in sorted order (some optimal grouping always
  is: moving a narrower row into a wider group never costs more);
* rows of equal width always share a group; ``forward_cost`` 0 gives each distinct width its
  own group, a very large one a single group; a negative cost is a ``ValueError``; an empty batch
  gives no groups;
* deterministic, and pure: ``O(d^2 + n * groups)`` for ``n`` rows of ``d`` distinct widths (``d``
  is at most the longest text's tokens, whatever the batch size).
"""

from __future__ import annotations

from collections.abc import Sequence


def width_groups(widths: Sequence[int], forward_cost: float) -> list[list[int]]:
    if forward_cost < 0:
        raise ValueError(f"forward_cost must be >= 0, got {forward_cost!r}")
    counts: dict[int, int] = {}
    for w in widths:
        counts[w] = counts.get(w, 0) + 1
    distinct = sorted(counts)  # rows of one width always share a group: cuts fall between widths
    rows_upto = [0]  # rows_upto[j]: rows of the j narrowest widths
    for w in distinct:
        rows_upto.append(rows_upto[-1] + counts[w])
    d = len(distinct)
    best = [0.0] + [float("inf")] * d  # best[j]: the cheapest grouping of the j narrowest widths' rows
    cut = [0] * (d + 1)  # where the last group of that grouping starts
    for j in range(1, d + 1):
        for i in range(j):  # the last group: widths i..j-1, every row padded to distinct[j-1]
            cost = best[i] + (rows_upto[j] - rows_upto[i]) * distinct[j - 1] + forward_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds: list[tuple[int, int]] = []
    j = d
    while j > 0:
        bounds.append((distinct[cut[j]], distinct[j - 1]))
        j = cut[j]
    return [[i for i, w in enumerate(widths) if lo <= w <= hi] for lo, hi in reversed(bounds)]
