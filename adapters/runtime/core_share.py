"""Idle cores lent to a lone forward pass: the serving workers of one instance share their cores.

On CPU a served instance runs one single-threaded worker per core (processes scale where
threads do not under load). At low load that wastes the machine: a lone request's forward pass
runs on one core while the other workers' cores sit idle, so one client sees a one-thread
forward (~1.5x slower for one MiniLM row on 2 cores) where an in-process engine would use them all.

``CoreShare`` lets each worker, for the duration of one forward pass, use every serving core
no other worker is using at that moment and that the machine has idle, and never fewer than
its own share:

* The workers of one instance share a small file (``path``, ``instance_path()``: one slot per
  process: its pid and the cores it uses now). ``lend()`` is a context manager around one forward pass: under an
  exclusive ``flock`` it sums the cores the other *live* processes hold, takes
  ``max(share, total - theirs)`` (at most ``total``), records that, and sets this process's
  torch intra-op threads to it; on exit it records 0 (threads stay as they are until the
  next pass). A slot of a dead process (SIGKILLed
  worker) is ignored and reused.
* Only cores idle machine-wide are borrowed: the kernel's count of runnable tasks right now
  (``/proc/loadavg``, our own running thread included) must leave them free. On a machine
  shared with other work a multi-threaded forward pass is a trap: measured on the loaded 2-core
  box (load average ~12), one MiniLM row took 77-218 ms with one thread and 0.8-1.4 s with two
  (OpenMP's threads wait at every op for a sibling the scheduler preempted). When the count
  cannot be read, nothing is borrowed. Runnable threads of this very process are not other
  work: when that count leaves too little idle, the process's own runnable threads
  (``/proc/self/task``: an OpenMP pool still spinning after the last pass, the event loop
  finishing the hand-over) are taken out of it. Without that, a quiet box lent the second core
  to only half of a lone client's passes (bench.http, one client: 192 of 376 on one thread).
  A blip of other work at that instant (a client finishing its send) still refused a third of
  them, so a second, smoothed signal may lend too: the CPU time the rest of the machine used
  since the last reading, at least ``WINDOW_TICKS`` of CPU ago (``/proc/stat`` less this
  process's own ``/proc/self/stat`` time): when other work averaged under ``QUIET_CORES`` of a
  core, the machine is quiet and the idle cores are lent whatever the instant says. A busy
  machine (a training job, a test run) shows in both signals, so nothing is borrowed there.
  Cost per pass: the instant count and the smoothed signal are three small reads (~30 us);
  the own-thread scan opens one file per thread of the process (~250 us for a serving
  worker's 24 threads, 2% of a lone MiniLM row's forward), so it runs only when neither
  cheaper signal already lends the cores.
* Claims are atomic (the lock), so two idle workers never both take every core; a worker that
  starts while another holds the lent cores still gets its own share (at worst ``share`` extra
  threads for the rest of the other's pass, never a wait).
* Several forward passes of one process at once (one batcher per task) share one claim: the
  first sets the threads, the last releases them.
* ``torch.set_num_threads`` is called only when the number changes (it is cheap, microseconds).
* Anything that fails (no file system, a full slot table) falls back to the worker's own
  share: lending is an optimisation, never a reason to fail a request.

``CoreShare.disabled(share)`` never lends (one worker, or a GPU): ``lend()`` only keeps the
share. ``threads_of_last_lend`` tells tests and metrics what the last pass used.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("tailor.cores")

SLOTS = 64
_SLOT = struct.Struct("<ii")  # pid, cores in use now
SIZE = SLOTS * _SLOT.size


def instance_path() -> Path:
    """The file the workers of this process's server share: keyed by the parent process (the
    ``bentoml serve`` that started them) and the user, in the temp folder."""
    return Path(tempfile.gettempdir()) / f"tailor-cores-{os.getuid()}-{os.getppid()}"


def runnable_now() -> int:
    """Tasks runnable on the machine at this instant (``/proc/loadavg``'s fourth field, the
    caller included); a large number when it cannot be read (then nothing is borrowed)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return 1 << 30


def own_runnable_threads() -> int:
    """This process's threads runnable at this instant (the caller included); 1 when it cannot
    be read. Only read when the machine-wide count leaves too little idle (tens of us)."""
    n = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        fields = _after_name(stat)
        if fields and fields[0] == b"R":
            n += 1
    return max(1, n)


def _after_name(stat: bytes) -> list[bytes]:
    """A ``/proc/.../stat`` line's fields after the name (state first): the name may hold spaces
    or parentheses, so it ends at the last ``)``."""
    return stat[stat.rfind(b")") + 2:].split()


WINDOW_TICKS = 20  # CPU clock ticks (USER_HZ, all cores together) between two CPU-time readings
QUIET_CORES = 0.25  # other work's average use of the machine below which it counts as quiet


def cpu_ticks() -> tuple[int, int] | None:
    """(all cores' ticks so far, their busy ticks: not idle nor iowait) from ``/proc/stat``."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    total = sum(fields)
    return total, total - fields[3] - fields[4]


def own_cpu_ticks() -> int | None:
    """This process's user + system ticks so far (``/proc/self/stat``)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        rest = _after_name(stat)
        return int(rest[11]) + int(rest[12])
    except (OSError, ValueError, IndexError):
        return None


class RecentOthers:
    """How many cores the rest of the machine used on average since the last reading that is
    at least ``WINDOW_TICKS`` old: None until two readings that far apart exist."""

    def __init__(self, machine: Callable[[], tuple[int, int] | None] = cpu_ticks,
                 own: Callable[[], int | None] = own_cpu_ticks, cpus: int | None = None) -> None:
        self._machine, self._own = machine, own
        self._cpus = machine_cpus() if cpus is None else cpus
        self._last: tuple[int, int, int] | None = None
        self.cores: float | None = None

    def read(self) -> float | None:
        m, own = self._machine(), self._own()
        if m is None or own is None:
            return None
        if self._last is None:
            self._last = (m[0], m[1], own)
            return self.cores
        total, busy = m[0] - self._last[0], m[1] - self._last[1]
        if total >= WINDOW_TICKS:
            others = max(0, busy - (own - self._last[2]))
            self.cores = others * self._cpus / total
            self._last = (m[0], m[1], own)
        return self.cores


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class CoreShare:
    def __init__(self, path: Path | None, total: int, share: int, *,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 get_threads: Callable[[], int] = torch.get_num_threads,
                 alive: Callable[[int], bool] = _alive, pid: int | None = None,
                 runnable: Callable[[], int] = runnable_now, cpus: int | None = None,
                 own_runnable: Callable[[], int] = own_runnable_threads,
                 recent_others: Callable[[], float | None] | None = None) -> None:
        if share < 1 or total < share:
            raise ValueError(f"need 1 <= share ({share}) <= total ({total})")
        self.total, self.share = total, share
        self._set_threads, self._get_threads, self._alive = set_threads, get_threads, alive
        self._runnable, self._cpus = runnable, machine_cpus() if cpus is None else cpus
        self._own_runnable = own_runnable
        self._recent_others = recent_others if recent_others is not None else RecentOthers(cpus=self._cpus).read
        self._lock = threading.Lock()
        self._active = 0
        self._pid = os.getpid() if pid is None else pid  # tests play several processes in one
        self._slot: int | None = None
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self.threads_of_last_lend = share
        if path is not None and total > share:
            try:
                self._open(path)
            except OSError as e:
                log.warning("cannot share idle cores through %s (%s): each forward uses %d thread(s)", path, e, share)
                self._close_file()

    @classmethod
    def disabled(cls, share: int) -> CoreShare:
        return cls(None, share, share)

    @property
    def lending(self) -> bool:
        return self._map is not None

    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = fd
        with self._locked():
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
        self._map = mmap.mmap(fd, SIZE)

    def _close_file(self) -> None:
        if self._map is not None:
            self._map.close()
        if self._fd is not None:
            os.close(self._fd)
        self._map = self._fd = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _entries(self) -> list[tuple[int, int]]:
        assert self._map is not None
        return [_SLOT.unpack_from(self._map, i * _SLOT.size) for i in range(SLOTS)]

    def _write(self, slot: int, pid: int, cores: int) -> None:
        assert self._map is not None
        _SLOT.pack_into(self._map, slot * _SLOT.size, pid, cores)

    def _claim(self) -> int:
        """Cores for this process's next pass, recorded in its slot (lock held by the caller)."""
        entries = self._entries()
        theirs = 0
        free: int | None = None
        for i, (pid, cores) in enumerate(entries):
            if pid == self._pid:
                self._slot = i
            elif pid == 0 or not self._alive(pid):
                if free is None:
                    free = i
            else:
                theirs += max(0, cores)
        if self._slot is None:
            if free is None:
                return self.share  # more processes than slots: keep to the share
            self._slot = free
        unclaimed = min(self.total, self.total - theirs) - self.share  # what our other workers leave
        busy = self._runnable()
        idle = self._cpus - busy  # what nothing on the machine wants now, beyond our thread
        recent = self._recent_others()  # read every pass: it keeps its window current
        if idle < unclaimed and recent is not None and recent < QUIET_CORES:
            idle = self._cpus - 1  # a quiet machine: a blip at this instant is not other work
        elif idle < unclaimed:  # our own runnable threads are not other work (see the module doc)
            idle = self._cpus - 1 - max(0, busy - self._own_runnable())
        n = self.share + max(0, min(unclaimed, idle))
        self._write(self._slot, self._pid, n)
        return n

    @contextmanager
    def lend(self) -> Iterator[int]:
        """Around one forward pass: the torch threads it runs with (see the module doc)."""
        with self._lock:
            self._active += 1
            if self._active == 1:
                n = self.share
                if self._map is not None:
                    try:
                        with self._locked():
                            n = self._claim()
                    except (OSError, ValueError) as e:
                        log.warning("core sharing failed (%s); using %d thread(s) from now on", e, self.share)
                        self._close_file()
                        n = self.share
                if self._get_threads() != n:
                    self._set_threads(n)
                self.threads_of_last_lend = n
            n = self.threads_of_last_lend
        try:
            yield n
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and self._map is not None and self._slot is not None:
                    try:
                        with self._locked():
                            self._write(self._slot, self._pid, 0)
                    except (OSError, ValueError):
                        self._close_file()

    def close(self) -> None:
        with self._lock:
            if self._map is not None and self._slot is not None:
                self._write(self._slot, 0, 0)
            self._close_file()
