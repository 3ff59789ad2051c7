"""The pool of training worker processes that a serving host runs next to the service.

``WorkerPool.start`` first recovers jobs whose worker on this host is gone (its process no
longer exists: a ``kill -9``, a crash, an OOM kill, a restart), then starts ``size`` worker
processes and a monitor thread that restarts any that exit. Only one pool runs per
``TAILOR_HOME``: with several serving workers, the first to take the lock file runs it and
the others do nothing. ``stop`` sends SIGTERM (running jobs resume from their checkpoints
later) and kills what does not exit in time. A worker whose serving process dies without
stopping the pool stops by itself (``parent_watch``).

``worker_args`` turns settings into a worker's command line, for the pool (``worker_command``)
and for ``tailor worker`` alike.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Protocol

from adapters.jobs.manager import JobManager
from adapters.jobs.parent_watch import ENV as PARENT_ENV
from adapters.tasks import TASK_NAMES

log = logging.getLogger("tailor.supervisor")


def local_worker_dead(worker_id: str) -> bool:
    """True if ``worker_id`` names a process on this host that no longer exists."""
    host, _, rest = worker_id.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another host's worker: only its lease can tell
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class WorkerPool:
    def __init__(self, manager: JobManager, command: list[str], *, size: int, lock_path: Path,
                 log_path: Path | None = None, env: dict[str, str] | None = None,
                 restart_delay: float = 2.0) -> None:
        self.manager, self.command, self.size = manager, command, size
        self.lock_path, self.log_path, self.env = lock_path, log_path, env
        self.restart_delay = restart_delay
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock_file: IO[str] | None = None
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self._lock_file is not None

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def start(self) -> bool:
        """Start the pool unless another process on this home already runs it."""
        if self.size <= 0:
            return False
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._lock_file = f
        recovered = self.manager.recover(is_dead=local_worker_dead)
        if recovered:
            log.warning("recovered %d job(s) whose worker died: %s", len(recovered), ", ".join(recovered))
        self._procs = [self._spawn() for _ in range(self.size)]
        self._monitor = threading.Thread(target=self._watch, name="worker-pool", daemon=True)
        self._monitor.start()
        return True

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join()
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, **(self.env or {}), PARENT_ENV: str(os.getpid())}  # see parent_watch
        return subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.restart_delay):
            for i, p in enumerate(self._procs):
                if p.poll() is not None and not self._stop.is_set():
                    log.warning("training worker %d exited with %s; restarting it", p.pid, p.returncode)
                    self.manager.recover(is_dead=local_worker_dead)
                    self._procs[i] = self._spawn()
                    self.restarts += 1


class WorkerSettings(Protocol):
    """What a training worker is configured by (``service.settings.Settings`` is one)."""

    @property
    def database_url(self) -> str: ...
    @property
    def store_url(self) -> str: ...
    @property
    def home(self) -> Path: ...  # checkpoints go to home/checkpoints
    @property
    def base_model(self) -> str | None: ...
    @property
    def store_gc_hours(self) -> float: ...
    @property
    def tasks(self) -> tuple[str, ...]: ...  # the task kinds the deployment serves (and trains)
    @property
    def image_base_model(self) -> str | None: ...  # None: the bundled vision base


WORKER_MODULE = "adapters.jobs.worker"


def worker_args(settings: WorkerSettings, *, threads: int | None, device: str | None = None,
                nice: int | None = None, once: bool = False) -> list[str]:
    """The worker's arguments (``adapters.jobs.worker.main`` takes them) for ``settings``: the one
    place settings become a worker's command line, for the pool here and ``tailor worker``.
    ``threads``, ``device``, ``nice``: left to the worker's defaults when None."""
    args = ["--database-url", settings.database_url, "--store-url", settings.store_url,
            "--checkpoints", str(settings.home / "checkpoints"), "--gc-hours", str(settings.store_gc_hours)]
    if nice is not None:
        args += ["--nice", str(nice)]
    if settings.base_model:
        args += ["--base-model", settings.base_model]
    if settings.image_base_model:
        args += ["--image-base-model", settings.image_base_model]
    if getattr(settings, "generation_base_model", None):  # None: the bundled SmolLM2
        args += ["--generation-base-model", settings.generation_base_model]
    if tuple(settings.tasks) != TASK_NAMES:
        args += ["--tasks", ",".join(settings.tasks)]
    if threads:
        args += ["--threads", str(threads)]
    if device:
        args += ["--device", device]
    runtime = getattr(settings, "runtime", "torch")  # the gate scores on the serving runtime
    if runtime != "torch":
        args += ["--runtime", runtime, "--quantize", getattr(settings, "quantize", "none"),
                 "--graph-cache", str(settings.home / "graphs")]
    if once:
        args.append("--once")
    return args


def worker_command(settings: WorkerSettings, *, threads: int | None, device: str | None = None) -> list[str]:
    """The command that starts a worker process (``worker_args`` after this Python)."""
    return [sys.executable, "-m", WORKER_MODULE, *worker_args(settings, threads=threads, device=device)]
