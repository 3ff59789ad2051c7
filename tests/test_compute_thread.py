"""ComputeThread: every batcher of a process runs its forward passes on one shared thread."""

from __future__ import annotations

import threading

import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.batcher import MicroBatcher
from adapters.runtime.compute_thread import ComputeThread
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact


def test_run_returns_on_the_callers_thread_what_ran_on_the_compute_thread() -> None:
    with ComputeThread(name="compute-under-test") as compute:
        ran_on = compute.run(lambda: threading.current_thread().name)
        assert ran_on == "compute-under-test"
        assert compute.run(lambda: compute.run(lambda: 7)) == 7  # from the compute thread itself: a plain call
        with pytest.raises(ZeroDivisionError):
            compute.run(lambda: 1 / 0)
        assert compute.run(lambda: "still serving") == "still serving"


def test_work_runs_in_order_and_close_refuses_more() -> None:
    compute = ComputeThread()
    seen: list[int] = []
    callers = [threading.Thread(target=compute.run, args=(lambda i=i: seen.append(i),)) for i in range(20)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert sorted(seen) == list(range(20))
    compute.close()
    compute.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        compute.run(lambda: None)


class ThreadRecordingEngine:
    """The real engine; records the thread each forward pass ran on."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.threads = engine, set()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def predict_rows(self, inputs, rows):
        self.threads.add(threading.current_thread().name)
        return self.engine.predict_rows(inputs, rows)


def test_two_batchers_sharing_a_compute_thread_run_every_pass_on_it(tmp_path) -> None:
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    engines = []
    for i, name in enumerate(("left", "right")):
        base = tiny_base(seed=i)
        engine = Engine(base, catalog, EngineConfig(max_resident=4, device_slots=9, max_batch_size=8))
        catalog.registry.create_tenant(name)
        catalog.publish(name, "clf", random_artifact(base.spec, seed=i), promote=True, spec=base.spec)
        engines.append((ThreadRecordingEngine(engine), engine.acquire(engine.resolve(name, "clf"))))
    with ComputeThread(name="shared-compute") as compute:
        batchers = [MicroBatcher(e, 8, 1.0, compute=compute, name=f"batcher-{i}") for i, (e, _) in enumerate(engines)]
        try:
            for _ in range(3):
                futures = [b.submit([(a, "hello there"), (a, "good day")]) for b, (_, a) in zip(batchers, engines)]
                for f, (_, a) in zip(futures, engines):
                    assert [p.label in a.labels for p in f.result(timeout=30)] == [True, True]
        finally:
            for b in batchers:
                b.close()
    assert [e.threads for e, _ in engines] == [{"shared-compute"}, {"shared-compute"}]
    alone = MicroBatcher(engines[0][0], 8, 1.0, name="batcher-alone")  # no compute thread: its own
    try:
        engines[0][0].threads.clear()
        alone.submit([(engines[0][1], "hi")]).result(timeout=30)
    finally:
        alone.close()
    assert engines[0][0].threads == {"batcher-alone"}
