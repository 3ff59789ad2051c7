"""One tenant's bad row, bad adapter or flood never costs another tenant its answer.

A real ``Engine`` (tiny base, SQLite registry, local store) behind a real ``MicroBatcher``;
the culprits are real too: a text the tokenizer cannot encode, an adapter whose tensors do
not fit the base (the merged forward raises), an adapter whose outputs overflow.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.errors import AdapterOutputError, InvalidInputError, TenantBusyError
from adapters.registry import Registry
from adapters.runtime.batcher import MicroBatcher
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.fair_queue import FairQueue
from adapters.runtime.inputs import check_texts
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.store import LocalStore
from adapters.synthetic import random_artifact

TENANTS = [f"t{i}" for i in range(6)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    base = tiny_base(seed=7)
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    reported: list[VersionKey] = []
    engine = Engine(base, catalog, EngineConfig(max_resident=64, device_slots=33, max_batch_size=32),
                    on_nonfinite=reported.append)
    adapters = {}
    for i, tenant in enumerate(TENANTS):
        catalog.registry.create_tenant(tenant)
        catalog.publish(tenant, "clf", random_artifact(base.spec, seed=i, n_labels=3), promote=True, spec=base.spec)
        adapters[tenant] = engine.acquire(engine.resolve(tenant, "clf"))
    return engine, adapters, reported


def variant(adapter: LoadedAdapter, tag: str, **changes) -> LoadedAdapter:
    key = dataclasses.replace(adapter.key, adapter=f"{adapter.key.adapter}-{tag}", sha256=tag * 8)
    return dataclasses.replace(adapter, key=key, **changes)


def misfit(adapter: LoadedAdapter) -> LoadedAdapter:
    """Tensors one column too wide for the base: building the batch's slots raises."""
    path, (a, b) = next(iter(adapter.lora.items()))
    return variant(adapter, "misfit", lora={**adapter.lora, path: (torch.zeros(a.shape[0], a.shape[1] + 1), b)})


def overflowing(adapter: LoadedAdapter) -> LoadedAdapter:
    lora = {p: (torch.full_like(a, 1e38), torch.full_like(b, 1e38)) for p, (a, b) in adapter.lora.items()}
    return variant(adapter, "overflow", lora=lora)


def wait_until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def same(p, q) -> bool:
    return p.label == q.label and all(abs(p.scores[k] - q.scores[k]) < 1e-5 for k in p.scores)


def test_text_that_is_not_unicode_is_refused_before_queueing(world):
    engine, adapters, _ = world
    with pytest.raises(InvalidInputError) as e:
        check_texts(["fine", "bad \ud800 text"])
    assert e.value.param == "inputs[1]" and "U+D800" in e.value.message
    check_texts(["plain", "naïve café", "emoji 🙂", "\x00 nul is a scalar value"])
    with MicroBatcher(engine, max_batch_size=8, max_wait_ms=1) as batcher:
        with pytest.raises(InvalidInputError, match=r"U\+DFFF"):
            batcher.submit([(adapters["t0"], "ok"), (adapters["t0"], "\udfff")])
        assert batcher.queued_rows == 0
        assert batcher.submit([(adapters["t0"], "ok")]).result(timeout=30)[0].label in adapters["t0"].labels


def test_a_row_that_breaks_the_merged_forward_fails_only_its_request(world):
    engine, adapters, _ = world
    bad = misfit(adapters["t1"])
    texts = {t: [f"{t} text {j}" for j in range(3)] for t in TENANTS}
    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=60_000) as batcher:
        # 6 victims of 3 rows + the culprit's 1 row, then 13 filler rows: one full merged batch
        victims = {t: batcher.submit([(adapters[t], x) for x in texts[t]]) for t in TENANTS}
        culprit = batcher.submit([(bad, "poison")], tenant="t1")
        filler = batcher.submit([(adapters["t2"], f"filler {j}") for j in range(13)])
        with pytest.raises(Exception) as raised:
            culprit.result(timeout=60)
        assert not isinstance(raised.value, (InvalidInputError, AdapterOutputError))
        for t, fut in victims.items():
            preds = fut.result(timeout=60)
            solo = engine.classify(texts[t], [adapters[t]] * 3)
            assert all(same(p, q) for p, q in zip(preds, solo)), t
        assert len(filler.result(timeout=60)) == 13
        assert batcher.batches == 1 and batcher.recent[-1].size == 32
        assert batcher.errors == 1 and batcher.isolated == 1


def test_an_adapter_with_non_finite_outputs_fails_its_own_rows_once_reported(world):
    engine, adapters, reported = world
    bad = overflowing(adapters["t3"])
    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=60_000) as batcher:
        futures = [batcher.submit([(bad, "a"), (bad, "b")]), batcher.submit([(adapters["t4"], "victim")])]
        futures += [batcher.submit([(bad, "again")])]
        futures += [batcher.submit([(adapters["t5"], f"x{j}")]) for j in range(28)]  # 32 rows: runs now
        with pytest.raises(AdapterOutputError, match="non-finite") as e:
            futures[0].result(timeout=60)
        assert e.value.param == "adapter"
        with pytest.raises(AdapterOutputError):
            futures[2].result(timeout=60)
        victim = futures[1].result(timeout=60)[0]
        assert victim.label in adapters["t4"].labels and all(0 <= s <= 1 for s in victim.scores.values())
        assert all(f.result(timeout=60)[0].label in adapters["t5"].labels for f in futures[3:])
        assert batcher.batches == 1 and batcher.errors == 0  # no retry: rows are independent
    assert reported.count(bad.key) == 1  # reported once, not per row or per request
    with pytest.raises(AdapterOutputError):
        engine.classify(["direct"], [bad])
    assert reported.count(bad.key) == 1


class GatedEngine:
    """The real engine; the first call waits at a gate so a test can line up the queue."""

    def __init__(self, engine):
        self.engine = engine
        self.entered, self.gate = threading.Event(), threading.Event()
        self.calls: list[list[str]] = []

    def __getattr__(self, name):  # config, task, check_row, check_adapter: the real engine's
        return getattr(self.engine, name)

    def predict_rows(self, texts, rows):
        self.calls.append(list(texts))
        self.entered.set()
        self.gate.wait(60)
        return self.engine.predict_rows(texts, rows)


def test_a_quiet_tenant_is_served_in_the_next_batch_whatever_a_flood_queued(world):
    engine, adapters, _ = world
    gated = GatedEngine(engine)
    flood, quiet = adapters["t0"], adapters["t1"]
    with MicroBatcher(gated, max_batch_size=16, max_wait_ms=0) as batcher:
        first = batcher.submit([(flood, "flood 0")])
        assert gated.entered.wait(30)  # the thread is busy with the first batch
        floods = [batcher.submit([(flood, f"flood {k}-{j}") for j in range(8)]) for k in range(1, 21)]
        lone = batcher.submit([(quiet, "quiet one")])
        assert batcher.queued_rows == 161 and batcher.queued_rows_of("t1") == 1
        gated.gate.set()
        lone.result(timeout=60)
        for f in [first, *floods]:
            f.result(timeout=60)
    assert "quiet one" in gated.calls[1]  # the first batch formed after it arrived
    assert sum(len(c) for c in gated.calls) == 162


def test_a_tenant_over_its_queue_limit_is_refused_before_queueing(world):
    engine, adapters, _ = world
    gated = GatedEngine(engine)
    with MicroBatcher(gated, max_batch_size=8, max_wait_ms=0, max_queued_rows_per_tenant=10) as batcher:
        running = batcher.submit([(adapters["t0"], "runs first")])
        assert gated.entered.wait(30)
        held = [batcher.submit([(adapters["t0"], f"r{j}") for j in range(4)]) for _ in range(2)]
        with pytest.raises(TenantBusyError, match="at most 10"):
            batcher.submit([(adapters["t0"], f"r{j}") for j in range(4)])
        other = batcher.submit([(adapters["t2"], f"o{j}") for j in range(10)])  # its own limit
        assert batcher.queued_rows_of("t0") == 8
        gated.gate.set()
        for f in [running, *held, other]:
            f.result(timeout=60)
        # a tenant with nothing waiting may queue one request of any size
        assert len(batcher.submit([(adapters["t0"], f"big {j}") for j in range(12)]).result(timeout=60)) == 12


class Item:
    def __init__(self, n: int, arrived: float = 0.0) -> None:
        self.n, self.arrived, self.gone = n, arrived, False

    @property
    def size(self) -> int:
        return self.n

    def abandoned(self) -> bool:
        return self.gone


def test_fair_queue_shares_batches_round_robin():
    q: FairQueue[Item] = FairQueue()
    a = [Item(10, arrived=1.0) for _ in range(3)]
    for item in a:
        q.push("a", item)
    b, c = Item(3, arrived=2.0), Item(1, arrived=3.0)
    q.push("b", b)
    q.push("c", c)
    assert q.oldest_arrival() == 1.0 and len(q) == 34 and q.tenants == 3
    first = q.take(9)
    sizes: dict[int, int] = {}
    for item, start, stop in first:
        sizes[id(item)] = sizes.get(id(item), 0) + stop - start
    assert sizes == {id(a[0]): 5, id(b): 3, id(c): 1}  # 3 each, then what c and b left goes to a
    a[1].gone = True  # abandoned: dropped without taking room
    rest = q.take(100)
    assert [(i is a[0], s, e) for i, s, e in rest[:1]] == [(True, 5, 10)]
    assert sum(e - s for _, s, e in rest) == 15 and len(q) == 0 and q.tenants == 0
    assert q.take(5) == [] and q.oldest_arrival() is None
