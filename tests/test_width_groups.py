"""Width groups: a mixed batch of very different widths runs as passes of similar width."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from adapters.artifact import AdapterArtifact
from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.errors import AdapterOutputError
from adapters.registry import Registry
from adapters.runtime.engine import SPLIT_COST_CPU, Engine, EngineConfig
from adapters.runtime.width_groups import width_groups
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from tests.test_fault_isolation import overflowing

SHORT = ["ok", "lost my bag", "great crew", "late again", "fine", "meh", "thanks", "no wifi"]
LONG = "a long review that goes on and on about the film " * 12  # ~120 tokens


def cost(groups: list[list[int]], widths: list[int], k: float) -> float:
    return sum(len(g) * max(widths[i] for i in g) for g in groups) + k * len(groups)


def brute_force(widths: list[int], k: float) -> float:
    """The cheapest partition of the rows sorted by width into runs (every way to cut them)."""
    w = sorted(widths)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(w) - 1):
        groups, start = [], 0
        for i, c in enumerate(cuts, 1):
            if c:
                groups.append(list(range(start, i)))
                start = i
        groups.append(list(range(start, len(w))))
        best = min(best, cost(groups, w, k))
    return best


def test_groups_partition_the_rows_and_are_as_cheap_as_any_cut():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        widths = [rng.choice([3, 5, 8, 20, 64, 128, 256]) for _ in range(n)]
        k = rng.choice([0, 10, 64, 256, 10_000])
        groups = width_groups(widths, k)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert all(g == sorted(g) for g in groups)
        maxes = [max(widths[i] for i in g) for g in groups]
        assert maxes == sorted(maxes)  # narrowest first
        assert cost(groups, widths, k) == pytest.approx(brute_force(widths, k))


def test_one_long_row_among_short_ones_gets_its_own_pass_and_equal_widths_stay_together():
    widths = [12] * 31 + [256]
    assert width_groups(widths, SPLIT_COST_CPU) == [list(range(31)), [31]]
    assert width_groups([12, 256, 12], 10**9) == [[0, 1, 2]]  # a pass dearer than any padding: one
    assert width_groups([7, 7, 7], 0) == [[0, 1, 2]]
    assert width_groups([], 5) == []
    with pytest.raises(ValueError, match="forward_cost"):
        width_groups([1, 2], -1)


def _engine(tmp_path, **config):
    tmp_path.mkdir(exist_ok=True)
    base = tiny_base(seed=1)
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/r.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    engine = Engine(base, catalog, EngineConfig(**config))
    art = random_artifact(base.spec, seed=1, n_labels=2)
    long_art = random_artifact(base.spec, seed=2, n_labels=3)
    long_art = AdapterArtifact(manifest=replace(long_art.manifest, max_length=128), weights=long_art.weights)
    for name, a in (("short", art), ("long", long_art)):
        catalog.publish("acme", name, a, promote=True, spec=base.spec)
    return engine, engine.acquire(engine.resolve("acme", "short")), engine.acquire(engine.resolve("acme", "long"))


def _passes(engine) -> list[tuple[int, int]]:
    """Record the (rows, width) of every forward pass the engine runs from now on."""
    seen: list[tuple[int, int]] = []
    run = engine.serving.run

    def recording(batch, plan, adapters):
        seen.append(tuple(batch["input_ids"].shape))
        return run(batch, plan, adapters)

    engine.serving.run = recording
    return seen


def test_a_long_row_pads_only_its_own_pass_and_every_answer_is_the_one_pass_answer(tmp_path):
    split, short, long = _engine(tmp_path / "a")  # auto: split on a CPU
    whole, short_w, long_w = _engine(tmp_path / "b", split_cost_tokens=0)
    assert split.split_cost == SPLIT_COST_CPU and whole.split_cost == 0
    texts = SHORT * 2 + [LONG] + SHORT[:3] + [LONG]
    rows_s = [short] * 16 + [long] + [None, short, short] + [long]
    rows_w = [short_w if r is short else long_w if r is long else None for r in rows_s]
    seen_s, seen_w = _passes(split), _passes(whole)
    got, want = split.predict_rows(texts, rows_s), whole.predict_rows(texts, rows_w)
    assert len(seen_w) == 1 and seen_w[0][0] == len(texts) and seen_w[0][1] > 100
    assert [n for n, _ in seen_s] == [19, 2] and seen_s[0][1] < 10 and seen_s[1][1] == seen_w[0][1]
    assert got[17] is None and want[17] is None  # the base row
    for g, w in zip(got, want):
        if w is not None:
            assert g.label == w.label and g.scores == pytest.approx(w.scores, abs=1e-5)


def test_an_adapter_with_non_finite_outputs_in_one_pass_fails_only_its_own_rows(tmp_path):
    engine, short, long = _engine(tmp_path)
    bad = overflowing(long)  # a long-text adapter whose outputs overflow: its pass is the long one
    seen = _passes(engine)
    preds = engine.predict_rows(SHORT[:4] + [LONG, LONG], [short] * 4 + [bad, long])
    assert [n for n, _ in seen] == [4, 2]
    assert all(p.label in short.labels for p in preds[:4])
    assert isinstance(preds[4], AdapterOutputError) and preds[5].label in long.labels


def test_a_negative_split_cost_is_refused(tmp_path):
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/r.db"), LocalStore(tmp_path / "store"))
    with pytest.raises(ValueError, match="split_cost_tokens"):
        Engine(tiny_base(seed=1), catalog, EngineConfig(split_cost_tokens=-1))


@pytest.mark.parametrize("side", ["right", "left"])
def test_take_rows_cuts_to_the_columns_the_rows_use(side: str) -> None:
    """take_rows (what serving's passes and training's batches use) keeps exactly the columns the
    chosen rows attend to, on either padding side, and each row's tokens unchanged."""
    import torch

    from adapters.base import take_rows
    base = tiny_base()
    base.tokenizer.padding_side = side
    try:
        batch = base.tokenize(["ok", LONG, "lost my bag"])
    finally:
        base.tokenizer.padding_side = "right"
    short = take_rows(batch, [0, 2])
    width = int(batch["attention_mask"][[0, 2]].sum(1).max())
    assert short["input_ids"].shape == (2, width) < batch["input_ids"].shape
    assert set(short) == set(batch)
    for j, i in enumerate([0, 2]):  # the kept row's real tokens, in order
        real = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        assert torch.equal(short["input_ids"][j][short["attention_mask"][j].bool()], real)
    assert torch.equal(take_rows(batch, torch.tensor([1]))["input_ids"][0], batch["input_ids"][1])
    unmasked = take_rows({"x": torch.arange(6).reshape(3, 2)}, [2])
    assert unmasked["x"].tolist() == [[4, 5]]
