"""The served process under soak: ``bentoml serve .`` with several serving workers and a
training worker, its process tree (RSS, which worker runs the training pool), and the kill.

BentoML's arbiter respawns a serving worker that dies (outside containers), so a worker
SIGKILLed here comes back as a new process with a new pid; the soak watches the
``X-Tailor-Worker`` header for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from service.instance import instance_env

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "soak-admin-key-0123456789"
TRAINING_WORKER = "adapters.jobs.worker"  # in a training worker's command line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RssSample:
    t: float  # monotonic
    total: int  # bytes, every process of the tree
    serving: int  # bytes, the tree less its training workers
    processes: int
    per_pid: dict[int, int]  # pid -> bytes
    load_average: float  # the machine's 1-minute load average (other processes share the cores)


class SoakServer:
    """``bentoml serve .`` in its own session, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, home: Path, port: int, *, workers: int, train_workers: int, base_model: str | None,
                 extra_env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TAILOR_HOME": str(home), "TAILOR_ADMIN_KEY": ADMIN_KEY,
               "TAILOR_WORKERS": str(workers), "TAILOR_TRAIN_WORKERS": str(train_workers),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "BENTOML_DO_NOT_TRACK": "True", **(extra_env or {})}
        if base_model:
            env["TAILOR_BASE_MODEL"] = base_model
        env = instance_env(env, port)  # its own BentoML home: metrics nobody else reads or wipes
        exe = Path(sys.executable).parent / "bentoml"
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bentoml"]
        self.home = home
        self.log_path = home / "serve.log"
        self.host, self.port = "127.0.0.1", port
        self.url = f"http://{self.host}:{port}"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*cmd, "serve", ".", "--host", self.host, "--port", str(port)],
                                     cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._seen: dict[int, psutil.Process] = {}  # every process of the tree ever seen
        self.roles: dict[int, str] = {}  # pid -> "arbiter" | "serving" | "training"

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def tree(self) -> list[psutil.Process]:
        """The serving process and every descendant now alive (training workers included)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def rss(self) -> RssSample:
        total = serving = n = 0
        per_pid: dict[int, int] = {}
        for p in self.tree():
            try:
                rss = p.memory_info().rss
                training = any(TRAINING_WORKER in part for part in p.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            total += rss
            serving += 0 if training else rss
            n += 1
            per_pid[p.pid] = rss
            self.roles.setdefault(p.pid, "arbiter" if p.pid == self.proc.pid else
                                  "training" if training else "serving")
        return RssSample(time.monotonic(), total, serving, n, per_pid, os.getloadavg()[0])

    def runs_training_pool(self, pid: int) -> bool:
        """Whether serving worker ``pid`` is the parent of the training workers."""
        try:
            return any(TRAINING_WORKER in " ".join(c.cmdline()) for c in psutil.Process(pid).children())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return False

    def is_worker(self, pid: int) -> bool:
        """``pid`` is a live process of this server's tree (a header is not trusted blindly)."""
        return any(p.pid == pid for p in self.tree())

    def kill(self, pid: int) -> None:
        if not self.is_worker(pid):
            raise RuntimeError(f"pid {pid} is not a process of this server")
        os.kill(pid, signal.SIGKILL)

    def orphans(self) -> list[int]:
        """Processes this tree once held that still live outside it (e.g. training workers of a
        killed serving worker, re-parented to init)."""
        alive = {p.pid for p in self.tree()}
        out = []
        for pid, p in self._seen.items():
            if pid not in alive and pid != self.proc.pid:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(pid)
                except psutil.NoSuchProcess:
                    pass
        return out

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop the service; kill any process it left behind. Returns the pids left behind."""
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + 10
        left = self._left_behind()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self._left_behind()
        for p in left:  # only processes this server started (seen in its tree)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()
        return [p.pid for p in left]

    def _left_behind(self) -> list[psutil.Process]:
        out = []
        for p in self._seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out
