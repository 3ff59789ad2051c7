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


def test_a_worker_stops_when_the_process_that_started_it_is_gone(tmp_path):
    """A SIGKILLed serving process cannot stop its pool: its workers notice and stop themselves."""
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    child = subprocess.Popen(
        [sys.executable, "-c", "import threading; from adapters.jobs.parent_watch import watch_parent; "
         "s = threading.Event(); assert watch_parent(s, interval=0.05) is not None; "
         "assert s.wait(60), 'never noticed'; print('stopped')"],
        env={**os.environ, "TAILOR_PARENT_PID": str(parent.pid)}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.poll() is None  # the parent lives: the worker goes on
        parent.kill()
        parent.wait()
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == "stopped"
    finally:
        for p in (parent, child):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_the_pool_names_itself_to_its_workers(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/t.db")
    manager = JobManager(reg.engine, LocalStore(tmp_path / "s"))
    out = tmp_path / "env.txt"
    cmd = [sys.executable, "-c", f"import os, time; open({str(out)!r}, 'w').write(os.environ['TAILOR_PARENT_PID']); "
           "time.sleep(120)"]
    p = WorkerPool(manager, cmd, size=1, lock_path=tmp_path / "pool.lock", restart_delay=0.1)
    assert p.start()
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert out.read_text() == str(os.getpid())
    finally:
        p.stop()
