"""The training worker pool: one per home, restarts workers that die, stops cleanly."""

from __future__ import annotations

import os
import signal
import sys
import time

from adapters.jobs.manager import JobManager
from adapters.jobs.supervisor import WorkerPool
from adapters.registry import Registry
from adapters.store import LocalStore

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def pool(tmp_path, manager, size=1):
    return WorkerPool(manager, SLEEPER, size=size, lock_path=tmp_path / "pool.lock", restart_delay=0.1)


def test_pool_restarts_dead_workers_and_runs_once_per_home(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/t.db")
    manager = JobManager(reg.engine, LocalStore(tmp_path / "s"))
    first, second = pool(tmp_path, manager, size=2), pool(tmp_path, manager)
    assert first.start()
    try:
        assert not second.start()  # another serving process already runs the pool
        pids = first.pids()
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while first.restarts < 1 or len(first.pids()) < 2:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.05)
        assert pids[0] not in first.pids() and pids[1] in first.pids()
    finally:
        first.stop(timeout=5)
    assert first.pids() == []
    assert second.start()  # the lock is free again once the first pool stopped
    second.stop(timeout=5)
