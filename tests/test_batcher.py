"""MicroBatcher over a real Engine (tiny base, SQLite registry, local store)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.batcher import MicroBatcher
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact

TENANTS = [f"t{i}" for i in range(8)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batcher")
    base = tiny_base(seed=5)
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    engine = Engine(base, catalog, EngineConfig(max_resident=64, device_slots=33, max_batch_size=32))
    adapters = {}
    for i, tenant in enumerate(TENANTS):
        catalog.registry.create_tenant(tenant)
        art = random_artifact(base.spec, seed=i, n_labels=2 + i % 4)
        catalog.publish(tenant, "clf", art, promote=True, spec=base.spec)
        adapters[tenant] = engine.acquire(engine.resolve(tenant, "clf"))
    return engine, adapters


def texts_for(tenant: str, n: int) -> list[str]:
    return [f"{tenant} says hello number {j} " + "word " * (j % 7) for j in range(n)]


def same(p, q) -> bool:
    return p.label == q.label and p.scores.keys() == q.scores.keys() and all(
        abs(p.scores[k] - q.scores[k]) < 1e-5 for k in p.scores)


def test_concurrent_tenants_share_batches(world):
    engine, adapters = world
    seen = []
    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=20,
                      on_batch=lambda size, n, s: seen.append((size, n))) as batcher:
        results: dict[tuple[str, int], list] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(len(TENANTS))

        def client(tenant: str) -> None:
            try:
                start.wait()
                for k in range(5):
                    texts = texts_for(tenant, 1 + (k + len(tenant)) % 5)
                    fut = batcher.submit([(adapters[tenant], t) for t in texts])
                    results[(tenant, k)] = (texts, fut.result(timeout=30))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(t,)) for t in TENANTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert batcher.rows == sum(len(texts) for texts, _ in results.values())
        assert max(r.adapters for r in batcher.recent) >= 2, [(r.size, r.adapters) for r in batcher.recent]
        assert batcher.batches < len(results)  # requests were merged
        assert len(seen) == batcher.batches and sum(s for s, _ in seen) == batcher.rows
    for (tenant, _), (texts, preds) in results.items():
        solo = engine.classify(texts, [adapters[tenant]] * len(texts))
        assert len(preds) == len(texts)
        assert all(same(p, q) for p, q in zip(preds, solo)), tenant


def test_large_request_is_split_and_kept_in_order(world):
    engine, adapters = world
    a, b = adapters["t1"], adapters["t2"]
    texts = texts_for("big", 75)
    rows = [(a if j % 3 else b, t) for j, t in enumerate(texts)]
    with MicroBatcher(engine, max_batch_size=16, max_wait_ms=1) as batcher:
        preds = batcher.submit(rows).result(timeout=30)
        assert batcher.batches == 5 and max(r.size for r in batcher.recent) == 16
    solo = engine.classify(texts, [r[0] for r in rows])
    assert len(preds) == 75 and all(same(p, q) for p, q in zip(preds, solo))


def test_asyncio_predict(world):
    engine, adapters = world

    async def main(batcher):
        jobs = [batcher.predict([(adapters[t], x) for x in texts_for(t, 3)]) for t in TENANTS]
        return await asyncio.gather(*jobs)

    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=20) as batcher:
        out = asyncio.run(main(batcher))
        assert batcher.batches < len(TENANTS)
    for t, preds in zip(TENANTS, out):
        solo = engine.classify(texts_for(t, 3), [adapters[t]] * 3)
        assert all(same(p, q) for p, q in zip(preds, solo))


class FlakyEngine:
    """The real engine, except that a batch holding the text 'boom' raises."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):  # config, task, check_row, check_adapter: the real engine's
        return getattr(self.engine, name)

    def predict_rows(self, texts, rows):
        if "boom" in texts:
            raise RuntimeError("boom")
        return self.engine.predict_rows(texts, rows)


def test_a_failed_batch_fails_only_its_requests(world):
    engine, adapters = world
    a = adapters["t3"]
    with MicroBatcher(FlakyEngine(engine), max_batch_size=4, max_wait_ms=50) as batcher:
        bad = batcher.submit([(a, "fine"), (a, "boom"), (a, "fine"), (a, "fine")])  # one full batch
        good = batcher.submit([(a, "x"), (a, "y")])  # lands in the next batch
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=30)
        assert len(good.result(timeout=30)) == 2
        assert batcher.errors == 1
        # the batcher keeps serving after a failure
        assert batcher.submit([(a, "again")]).result(timeout=30)[0].label in a.labels


def test_empty_bad_rows_and_close(world):
    engine, adapters = world
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_ms=1)
    assert batcher.submit([]).result(timeout=1) == []
    with pytest.raises(TypeError):
        batcher.submit([("not an adapter", "text")])
    with pytest.raises(ValueError):
        MicroBatcher(engine, max_batch_size=engine.config.max_batch_size + 1)
    batcher.close()
    assert not batcher._thread.is_alive()
    with pytest.raises(RuntimeError):
        batcher.submit([(adapters["t0"], "late")])


def wait_until(check, timeout: float = 30.0) -> None:
    """Wait for a condition of the batcher's thread (a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def test_waits_for_more_rows_and_merges_them(world):
    engine, adapters = world
    a = adapters["t4"]
    with MicroBatcher(engine, max_batch_size=2, max_wait_ms=60_000) as batcher:
        first = batcher.submit([(a, "one")])
        wait_until(lambda: batcher.waiting)  # the thread holds the batch open for more rows
        assert not first.done()
        second = batcher.submit([(a, "two")])  # fills the batch: it runs at once
        first.result(timeout=30), second.result(timeout=30)
        assert batcher.batches == 1 and batcher.recent[-1].requests == 2


def test_a_lone_request_runs_after_max_wait(world):
    engine, adapters = world
    a = adapters["t4"]
    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=10) as batcher:
        assert batcher.submit([(a, "alone")]).result(timeout=30)[0].label in a.labels
        assert batcher.batches == 1 and batcher.recent[-1].size == 1


HOUR_MS = 3_600_000  # a batching window no test could sit out: answered at all = not held for it


def test_a_lone_announced_request_is_not_held_for_the_window(world):
    engine, adapters = world
    a = adapters["t5"]
    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=HOUR_MS, announced_arrivals=True) as batcher:
        for text in ("alone", "alone again"):
            with batcher.incoming():  # as the route does: its own submit ends its announcement
                lone = batcher.submit([(a, text)])
            assert lone.result(timeout=60)[0].label in a.labels
        assert batcher.held == 0, "a lone request must be taken at once, not held for its own announcement"
        assert batcher.batches == 2


def test_another_announced_request_holds_the_batch_open(world):
    engine, adapters = world
    a = adapters["t5"]
    other = contextvars.copy_context()  # another request (its own asyncio task or thread)
    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=HOUR_MS, announced_arrivals=True) as batcher:
        arriving = batcher.incoming()
        other.run(arriving.__enter__)
        with batcher.incoming():
            first = batcher.submit([(a, "first")])
        wait_until(lambda: batcher.waiting)  # held for the announced one
        assert not first.done()
        second = other.run(batcher.submit, [(a, "second")])
        other.run(arriving.__exit__, None, None, None)
        first.result(timeout=60), second.result(timeout=60)
        assert batcher.recent[-1].requests == 2 and batcher.batches == 1 and batcher.held == 1


def test_an_announced_request_that_fails_before_submitting_releases_the_wait(world):
    engine, adapters = world
    a = adapters["t5"]
    other = contextvars.copy_context()
    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=HOUR_MS, announced_arrivals=True) as batcher:
        failing = batcher.incoming()
        other.run(failing.__enter__)
        with batcher.incoming():
            waiting = batcher.submit([(a, "waits for the failing one")])
        wait_until(lambda: batcher.waiting)
        error = KeyError("unknown adapter")  # it fails before its submit: its exit ends the announcement
        assert not other.run(failing.__exit__, KeyError, error, None)  # and does not swallow the error
        assert waiting.result(timeout=60)[0].label in a.labels


def test_announcements_belong_to_their_own_asyncio_task(world):
    """Two requests on one event loop: the first to submit ends only its own announcement, so
    its rows wait for the second, which is still on its way; both share one forward pass."""
    engine, adapters = world
    a = adapters["t6"]

    async def scenario(batcher: MicroBatcher) -> None:
        second_may_submit = asyncio.Event()

        async def request(text: str, gate: asyncio.Event | None) -> list:
            with batcher.incoming():
                if gate is not None:
                    await gate.wait()
                future = batcher.submit([(a, text)])
            return await asyncio.wrap_future(future)

        first = asyncio.create_task(request("first", None))
        second = asyncio.create_task(request("second", second_may_submit))
        while not batcher.waiting:  # the first one's rows are held for the second
            await asyncio.sleep(0.001)
        assert not first.done()
        second_may_submit.set()
        await asyncio.gather(first, second)

    with MicroBatcher(engine, max_batch_size=32, max_wait_ms=HOUR_MS, announced_arrivals=True) as batcher:
        asyncio.run(scenario(batcher))
        assert batcher.batches == 1 and batcher.recent[-1].requests == 2
