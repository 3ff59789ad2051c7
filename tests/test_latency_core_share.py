"""CoreShare: a lone forward pass borrows the cores the instance's other workers leave idle.

Several "processes" are played in one by giving each CoreShare its own pid; liveness is
injected, and so is the function that sets torch's threads (recorded, not applied).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.batcher import MicroBatcher
from adapters.runtime.core_share import CoreShare, own_runnable_threads
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact


class Threads:
    """torch.set_num_threads / get_num_threads of one pretend process."""

    def __init__(self, n: int = 1) -> None:
        self.n, self.calls = n, 0

    def set(self, n: int) -> None:
        self.n, self.calls = n, self.calls + 1

    def get(self) -> int:
        return self.n


class Machine:
    """The machine's runnable tasks right now, as /proc/loadavg would say (our thread included),
    and those of them that are our process's own threads (``mine``: beside the caller)."""

    def __init__(self, cpus: int) -> None:
        self.cpus, self.others, self.mine = cpus, 0, 0
        self.recent: float | None = None  # other work's average cores lately (None: not known yet)
        self.scans = 0  # reads of our own runnable threads (the costly one: a file per thread)

    def recent_others(self) -> float | None:
        return self.recent

    def runnable(self) -> int:
        return 1 + self.mine + self.others

    def own(self) -> int:
        self.scans += 1
        return 1 + self.mine


QUIET = Machine(cpus=64)  # nothing else runs: only the claims decide


def worker(path: Path, pid: int, live: set[int], total: int = 2, share: int = 1,
           machine: Machine = QUIET) -> tuple[CoreShare, Threads]:
    threads = Threads(share)
    live.add(pid)
    return CoreShare(path, total, share, set_threads=threads.set, get_threads=threads.get,
                     alive=lambda p: p in live, pid=pid, runnable=machine.runnable, cpus=machine.cpus,
                     own_runnable=machine.own, recent_others=machine.recent_others), threads


def test_a_lone_pass_takes_every_idle_core_and_a_busy_peer_keeps_its_share(tmp_path: Path) -> None:
    live: set[int] = set()
    a, ta = worker(tmp_path / "cores", 101, live)
    b, tb = worker(tmp_path / "cores", 102, live)
    with a.lend() as n:
        assert n == 2 and ta.n == 2  # b is idle: a borrows its core
        with b.lend() as m:
            assert m == 1 and tb.n == 1  # a holds both: b still gets its own share, no wait
    with b.lend() as m:
        assert m == 2 and tb.n == 2  # a released its claim
    assert a.lending and b.lending


def test_nothing_is_borrowed_from_a_machine_busy_with_other_work(tmp_path: Path) -> None:
    live: set[int] = set()
    box = Machine(cpus=2)
    a, ta = worker(tmp_path / "cores", 151, live, machine=box)
    with a.lend() as n:
        assert n == 2  # only our thread is runnable: the other core is idle
    box.others = 1  # another process (a test run, a training job) is running
    with a.lend() as n:
        assert n == 1 and ta.n == 1
    box.others = 12
    with a.lend() as n:
        assert n == 1
    four = Machine(cpus=4)
    b, _ = worker(tmp_path / "cores4", 152, live, total=4, machine=four)
    four.others = 2
    with b.lend() as n:
        assert n == 2  # one idle core beyond ours: borrow just that one


def test_our_own_runnable_threads_are_not_other_work(tmp_path: Path) -> None:
    live: set[int] = set()
    box = Machine(cpus=2)
    a, ta = worker(tmp_path / "cores", 161, live, machine=box)
    box.mine = 1  # the last pass's OpenMP thread still spinning, or our event loop handing over
    with a.lend() as n:
        assert n == 2 and ta.n == 2  # /proc/loadavg says 2 runnable, but both are ours
    box.others = 1  # and now another process runs too
    with a.lend() as n:
        assert n == 1 and ta.n == 1


def test_a_quiet_machine_lends_despite_a_blip_at_that_instant(tmp_path: Path) -> None:
    live: set[int] = set()
    box = Machine(cpus=2)
    a, ta = worker(tmp_path / "cores", 171, live, machine=box)
    box.others = 1  # something else is runnable right now (a client finishing its send)
    with a.lend() as n:
        assert n == 1  # nothing known about the recent past: the instant decides
    box.recent = 0.05  # but lately the rest of the machine used 5% of a core
    with a.lend() as n:
        assert n == 2 and ta.n == 2
    box.recent = 0.9  # a busy machine (a training job): the instant decides again
    with a.lend() as n:
        assert n == 1 and ta.n == 1
    box.others = 0
    with a.lend() as n:
        assert n == 2  # idle right now


def test_a_quiet_machine_lends_without_scanning_our_threads(tmp_path: Path) -> None:
    live: set[int] = set()
    box = Machine(cpus=2)
    a, ta = worker(tmp_path / "cores", 175, live, machine=box)
    box.mine, box.recent = 1, 0.05  # our OpenMP thread still spinning; the machine quiet lately
    with a.lend() as n:
        assert n == 2 and ta.n == 2
    assert box.scans == 0  # the cheap signal lent the core: no file per thread was read
    box.others = 0
    box.mine = 0
    with a.lend() as n:
        assert n == 2
    assert box.scans == 0  # idle right now: nothing more to read
    box.mine, box.recent = 1, 0.9  # a busy machine lately: only the scan tells our threads apart
    with a.lend() as n:
        assert n == 2
    assert box.scans == 1


def test_recent_others_is_the_machines_busy_time_less_ours_over_a_window() -> None:
    from adapters.runtime.core_share import WINDOW_TICKS, RecentOthers

    clock = {"total": 1000, "busy": 400, "own": 50}
    r = RecentOthers(machine=lambda: (clock["total"], clock["busy"]), own=lambda: clock["own"], cpus=2)
    assert r.read() is None  # one reading: no window yet
    clock.update(total=1000 + WINDOW_TICKS - 2, busy=410)
    assert r.read() is None  # too short a window: not measured
    clock.update(total=1100, busy=460, own=90)  # 100 ticks on 2 cores: 60 busy, 40 of them ours
    assert r.read() == pytest.approx(20 * 2 / 100)  # others used 0.4 of a core
    clock.update(total=1200, busy=560, own=190)  # only we ran
    assert r.read() == 0.0
    gone = RecentOthers(machine=lambda: None, own=lambda: 0, cpus=2)
    assert gone.read() is None  # /proc unreadable: unknown, nothing lent on its account


def test_own_runnable_threads_counts_this_process_running_threads() -> None:
    assert own_runnable_threads() >= 1  # the caller is running while it reads
    stop = threading.Event()
    data = b"x" * (1 << 22)

    def spin() -> None:  # hashing a large buffer releases the GIL: the thread stays runnable
        while not stop.is_set():
            hashlib.sha256(data).digest()

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        seen = 1
        while seen < 2 and time.monotonic() < deadline:
            seen = max(seen, own_runnable_threads())
        assert seen >= 2  # the spinning thread and the caller
    finally:
        stop.set()
        t.join()


def test_a_dead_workers_claim_is_ignored(tmp_path: Path) -> None:
    live: set[int] = set()
    a, _ = worker(tmp_path / "cores", 201, live)
    b, _ = worker(tmp_path / "cores", 202, live)
    held = a.lend()
    assert held.__enter__() == 2
    with b.lend() as m:
        assert m == 1
    live.discard(201)  # a is SIGKILLed mid-pass: its slot still says 2
    with b.lend() as m:
        assert m == 2


def test_four_workers_on_four_cores_share_what_is_idle(tmp_path: Path) -> None:
    live: set[int] = set()
    ws = [worker(tmp_path / "cores", 300 + i, live, total=4, share=1)[0] for i in range(4)]
    first = ws[0].lend()
    assert first.__enter__() == 4
    second = ws[1].lend()
    assert second.__enter__() == 1  # the first holds all four
    first.__exit__(None, None, None)
    with ws[2].lend() as n:
        assert n == 3  # the second still holds one
    second.__exit__(None, None, None)


def test_overlapping_passes_of_one_process_share_one_claim(tmp_path: Path) -> None:
    live: set[int] = set()
    a, ta = worker(tmp_path / "cores", 401, live)
    b, _ = worker(tmp_path / "cores", 402, live)
    with a.lend() as n:  # e.g. the text batcher
        with a.lend() as m:  # and the image batcher, at the same time
            assert n == m == 2
        with b.lend() as k:
            assert k == 1  # a's claim lasts until its last pass ends
    assert ta.calls == 1  # threads are set when they change, not per pass
    with b.lend() as k:
        assert k == 2


def test_disabled_or_unusable_sharing_keeps_the_share(tmp_path: Path) -> None:
    threads = Threads(3)
    off = CoreShare.disabled(1)
    assert not off.lending
    with off.lend() as n:
        assert n == 1
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    broken = CoreShare(blocked / "cores", 2, 1, set_threads=threads.set, get_threads=threads.get)
    assert not broken.lending
    with broken.lend() as n:
        assert n == 1 and threads.n == 1
    with pytest.raises(ValueError):
        CoreShare(None, 1, 2)


def test_the_batcher_runs_each_forward_pass_inside_a_lend(tmp_path: Path) -> None:
    base = tiny_base(seed=3)
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/r.db"), LocalStore(tmp_path / "store"))
    engine = Engine(base, catalog, EngineConfig(max_resident=4, device_slots=9, max_batch_size=8))
    catalog.registry.create_tenant("acme")
    catalog.publish("acme", "clf", random_artifact(base.spec, seed=1), promote=True, spec=base.spec)
    adapter = engine.acquire(engine.resolve("acme", "clf"))
    live: set[int] = set()
    mine, threads = worker(tmp_path / "cores", 501, live)
    peer, _ = worker(tmp_path / "cores", 502, live)
    with MicroBatcher(engine, max_batch_size=8, max_wait_ms=0, cores=mine) as batcher:
        batcher.submit([(adapter, "alone")]).result(timeout=60)
        assert mine.threads_of_last_lend == 2 and threads.n == 2  # the peer was idle: both cores
        with peer.lend():
            batcher.submit([(adapter, "beside a busy peer")]).result(timeout=60)
        assert mine.threads_of_last_lend == 1 and threads.n == 1
    with peer.lend() as n:
        assert n == 2  # the batcher's pass released its claim when it ended
