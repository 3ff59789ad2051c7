"""The running batch's per-row LoRA kept in place (issue 16, ``adapters.generation.rows``).

After any sequence of joins and leaves (different ranks and target sets, base rows, rank
growth with live rows), the incrementally maintained rows give the same prefill and decode
logits as a plan gathered from scratch for the same rows (the buffer holds max_rows rows from
the start: no grow-and-copy); a step without a change copies nothing and reuses its plan, a join copies one row, a leave at most one. And a batched prefill of
ragged prompts of different tenants, appended after live rows, gives every row the logits and
first token it gets prefilled alone, and the same next decode step."""

from __future__ import annotations

import random
from contextlib import nullcontext
import tempfile
from pathlib import Path

import pytest
import torch

from adapters.generation.base import tiny_causal_base
from adapters.generation.decoder import Decoder
from adapters.generation.engine import SEPARATE
from adapters.generation.rows import RowLoras
from adapters.generation.synthetic import random_generation_artifact
from adapters.runtime.context import use_plan
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.lora_layer import wrap_linears
from adapters.runtime.slots import SlotBank
from tests import torch_threads

one_thread = torch_threads.one_thread  # autouse: one torch thread in this module

CACHE = Path(tempfile.gettempdir()) / "tailor-test" / "bases"
KINDS = [  # rank, targets: the last one's rank is larger than any before it (growth with live rows)
    (2, ("q_proj", "v_proj")),
    (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (3, ("gate_proj", "down_proj")),
    (1, ("o_proj",)),
    (16, ("k_proj", "up_proj", "down_proj")),
]



@pytest.fixture(scope="module")
def world():
    base = tiny_causal_base(7, cache_dir=CACHE)
    wrap_linears(base.model, list(base.spec.linear_shapes))
    adapters = []
    for i, (r, targets) in enumerate(KINDS):
        art = random_generation_artifact(base.spec, r=r, targets=targets, seed=40 + i, std=0.2)
        key = VersionKey("acme", f"a{i}", 1, f"{i:064d}")
        adapters.append(LoadedAdapter.from_artifact(key, art, base.dtype))
    return base, Decoder(base), adapters


def new_rows(base, max_rows: int) -> RowLoras:
    return RowLoras(base.spec.linear_shapes, base.device, base.dtype, max_rows, separate=SEPARATE)


def forward(dec: Decoder, plan, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the rows' prompts, then one decode step: both logits."""
    t = max(map(len, prompts))
    kv = dec.new_cache(1 << 26)
    kv.ensure(len(prompts), t + 1, live=0)
    ids = torch.tensor([p + [0] * (t - len(p)) for p in prompts])
    nxt = torch.tensor([(13 * i + 5) % 500 for i in range(len(prompts))])
    with use_plan(plan):
        first = dec.prefill(ids, [len(p) for p in prompts], kv, 0)
        second = dec.decode(nxt, torch.tensor([len(p) for p in prompts]), kv)
    return first, second


def test_joins_and_leaves_keep_the_rows_equal_to_a_plan_built_from_scratch(world):
    base, dec, adapters = world
    rng = random.Random(3)
    rows = new_rows(base, max_rows=12)
    bank = SlotBank(base.spec.linear_shapes, 0, 13, base.device, base.dtype, separate=SEPARATE)
    prompts: list[list[int]] = []  # each live row's own prompt (moves with its row)
    ops = ["join"] * 10 + [rng.choice(["join", "leave", "leave"]) for _ in range(14)] + ["join"] * 3
    late = adapters[-1]  # the largest rank joins only once other rows are live
    widened = False
    for step, op in enumerate(ops):
        written, relayouts = rows.rows_written, rows.relayouts
        if op == "join" and len(rows) < rows.max_rows:
            pool = adapters[:-1] + [None] if step < 6 else adapters + [None]
            adapter = pool[rng.randrange(len(pool))] if step != 6 else late
            relaid = sum(a is not None for a in rows.rows)  # rewritten if the layout must widen
            rows.append([adapter])
            prompts.append([rng.randrange(1, 500) for _ in range(rng.randint(3, 9))])
            if rows.relayouts == relayouts:
                assert rows.rows_written == written + 1  # a join copies its own row only
            else:
                assert rows.rows_written == written + 1 + relaid
                widened = True
        elif op == "leave" and len(rows) > 1:
            i = rng.randrange(len(rows))
            moved = i != len(rows) - 1
            rows.remove(i)
            if moved:
                prompts[i] = prompts[-1]
            prompts.pop()
            assert rows.rows_written == written + int(moved)  # the last row fills the hole
        assert rows.rows_cap == rows.max_rows
        live = list(rows.rows)
        plan = rows.plan(0, len(live))
        before = rows.rows_written
        assert rows.plan(0, len(live)) is plan and rows.rows_written == before  # reused, nothing copied
        if all(a is None for a in live):
            assert plan is None
            continue
        got = forward(dec, plan, prompts)
        want = forward(dec, bank.plan(live), prompts)
        for g, w in zip(got, want):
            assert (g - w).abs().max().item() < 1e-5
    assert widened  # the rank grew with live rows (step 6)
    # the adapters really act: every adapter row differs from the base model on its prompt
    live = list(rows.rows)
    plain = forward(dec, None, prompts)[0]
    ours = forward(dec, rows.plan(0, len(live)), prompts)[0]
    for i, a in enumerate(live):
        diff = (ours[i] - plain[i]).abs().max().item()
        assert (diff > 1e-3) if a is not None else (diff < 1e-5)


def test_a_step_without_a_change_copies_nothing(world):
    base, dec, adapters = world
    rows = new_rows(base, max_rows=4)
    rows.append([adapters[0], None, adapters[1]])
    assert rows.rows_written == 3
    plan = rows.plan(0, 3)
    for _ in range(3):
        assert rows.plan(0, 3) is plan
    assert rows.rows_written == 3
    rows.remove(2)  # the last row leaves: nothing moves
    assert rows.rows_written == 3 and rows.plan(0, 2) is not plan
    rows.remove(0)  # a row in the middle: the last one moves into its hole
    assert rows.rows_written == 4 and rows.rows == [None] and rows.plan(0, 1) is None
    with pytest.raises(ValueError, match="exceed"):
        rows.append([adapters[0]] * 4)
    live = rows.live  # a view of the one live row: the buffer's first row
    assert live is not None and live.shape[0] == 1 and live.numel() * live.element_size() * rows.rows_cap == rows.nbytes
    rows.clear()
    assert rows.nbytes == 0 and len(rows) == 0 and rows.live is None
    # the layout starts afresh: a row image laid out for the wider one before is not reused
    rows.append([adapters[2], adapters[0]])
    bank = SlotBank(base.spec.linear_shapes, 0, 3, base.device, base.dtype, separate=SEPARATE)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    for g, w in zip(forward(dec, rows.plan(0, 2), prompts), forward(dec, bank.plan(list(rows.rows)), prompts)):
        assert (g - w).abs().max().item() < 1e-5


def test_a_batched_prefill_of_ragged_prompts_equals_each_prefilled_alone(world):
    base, dec, adapters = world
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 500) for _ in range(n)] for n in (7, 3, 12, 5, 9)]
    tenants = [adapters[1], None, adapters[0], adapters[4], adapters[2]]
    # two rows are live already; three arrive together and are prefilled in one forward after them
    rows = new_rows(base, max_rows=8)
    kv = dec.new_cache(1 << 26)
    kv.ensure(5, 16, live=0)
    live, arriving = [0, 1], [2, 3, 4]

    def prefill(r: RowLoras, cache, idx: list[int], row0: int) -> torch.Tensor:
        r.append([tenants[i] for i in idx])
        t = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([prompts[i] + [0] * (t - len(prompts[i])) for i in idx])
        plan = r.plan(row0, row0 + len(idx))
        with use_plan(plan) if plan is not None else nullcontext():
            return dec.prefill(ids, [len(prompts[i]) for i in idx], cache, row0)

    first = torch.cat([prefill(rows, kv, live, 0), prefill(rows, kv, arriving, 2)])
    nxt = first.argmax(dim=-1)
    with use_plan(rows.plan(0, 5)):
        second = dec.decode(nxt, torch.tensor([len(p) for p in prompts]), kv)
    for i in range(5):
        alone_rows = new_rows(base, max_rows=1)
        alone_kv = dec.new_cache(1 << 24)
        alone_kv.ensure(1, 16, live=0)
        a_first = prefill(alone_rows, alone_kv, [i], 0)[0]
        assert int(a_first.argmax()) == int(nxt[i])
        plan = alone_rows.plan(0, 1)
        with use_plan(plan) if plan is not None else nullcontext():
            a_second = dec.decode(nxt[i : i + 1], torch.tensor([len(prompts[i])]), alone_kv)[0]
        assert (first[i] - a_first).abs().max().item() < 1e-5
        assert (second[i] - a_second).abs().max().item() < 1e-5


def test_base_rows_are_zeroed_only_when_a_plan_reads_them(world):
    """A base-only batch in a buffer kept from a mixed one writes nothing; the first plan with an
    adapter zeroes the base rows it covers (whatever garbage the kept buffer held there)."""
    base, dec, adapters = world
    rows = new_rows(base, max_rows=6)
    rows.append([adapters[1]] * 4)  # a full-rank row image in every row: garbage for base rows later
    rows.reset()  # the batch emptied; the buffer stays
    rows.append([None, None, None])
    assert rows.plan(0, 3) is None and rows.rows_zeroed == 0  # base only: nothing written
    rows.remove(0)  # a base row moves into the hole: no copy either
    assert rows.rows_zeroed == 0
    rows.append([adapters[0]])
    plan = rows.plan(0, 3)
    assert rows.rows_zeroed == 2  # the two base rows, once
    assert rows.plan(0, 3) is plan and rows.rows_zeroed == 2
    bank = SlotBank(base.spec.linear_shapes, 0, 4, base.device, base.dtype, separate=SEPARATE)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    for g, w in zip(forward(dec, plan, prompts), forward(dec, bank.plan(list(rows.rows)), prompts)):
        assert (g - w).abs().max().item() < 1e-5


def test_decode_steps_reuse_one_kept_x_at_a_buffer_and_stay_exact(world):
    """A plan kept across decode steps writes each group's one-token ``x @ A`` into one buffer
    (allocated on the first step) and hands each module a view taken once; every step, with new
    tokens, still equals a plan gathered from scratch; a prefill through the same plan (several
    tokens per row) does not touch the buffer."""
    base, dec, adapters = world
    rows = new_rows(base, max_rows=4)
    live = [adapters[1], None, adapters[0], adapters[2]]
    rows.append(live)
    plan = rows.plan(0, 4)
    bank = SlotBank(base.spec.linear_shapes, 0, 5, base.device, base.dtype, separate=SEPARATE)
    fresh = bank.plan(live)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    t = max(map(len, prompts))
    kvs = []
    for p in (plan, fresh):
        kv = dec.new_cache(1 << 26)
        kv.ensure(4, t + 4, live=0)
        ids = torch.tensor([q + [0] * (t - len(q)) for q in prompts])
        with use_plan(p):
            dec.prefill(ids, [len(q) for q in prompts], kv, 0)
        kvs.append(kv)
    groups = {id(mp.group): mp.group for mp in plan.modules.values()}.values()
    assert all(g.keep_out and g._out is None for g in groups)  # the prefill allocated no kept buffer
    buffers = None
    for step in range(3):
        nxt = torch.tensor([(31 * step + 7 * i + 3) % 500 for i in range(4)])
        positions = torch.tensor([len(q) + step for q in prompts])
        with use_plan(plan):
            got = dec.decode(nxt, positions, kvs[0])
        with use_plan(fresh):
            want = dec.decode(nxt, positions, kvs[1])
        assert (got - want).abs().max().item() < 1e-5
        now = [g._out for g in groups]
        assert all(b is not None and b.shape[:2] == (4, 1) for b in now)
        if buffers is not None:
            assert all(a is b for a, b in zip(now, buffers))  # the same buffers, every step
        buffers = now
    sliced = [mp for mp in plan.modules.values() if mp.start or mp.stop != mp.group._out.shape[-1]]
    assert sliced and all(mp._cols_of is mp.group._out for mp in sliced)  # views taken once, kept
