"""A multi-replica Tailor on one machine, on 127.0.0.1 only, built from the real parts:

    python -m deploy.local.cluster up [--dir .cluster] [--replicas 2] [--workers 1]

* PostgreSQL (Debian's ``postgresql``; the registry, jobs, keys, files' rows),
* an S3-compatible server (moto's server mode from PyPI, standing in for MinIO/S3; adapters
  and uploaded training files),
* ``--replicas`` serving replicas (``bentoml serve .``, no in-process training),
* ``--workers`` training workers (``tailor worker``),
* NGINX in front: port ``--port`` routes by consistent hash of the ``Authorization`` header
  (tenant affinity), ``--port + 1`` round robin (the baseline for ``bench.cluster``).

``up`` stays in the foreground, prints the URLs and the admin key, and tears everything down
on Ctrl-C / SIGTERM. ``Cluster`` is the same thing as a Python object for tests and
benchmarks: ``start()``, ``kill_replica(i)`` (SIGKILL), ``start_replica(i)``, ``stop()``.
Logs live under ``--dir``; the object store is in moto's memory and PostgreSQL's data in a
temporary directory when run as root (it runs as the ``postgres`` user): neither survives
``stop()`` -- this is a development and test cluster.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.local.nginx import Router
from deploy.local.postgres import PostgresServer
from service.instance import instance_env

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tailor"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "tailor-local", "AWS_SECRET_ACCESS_KEY": "tailor-local-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.0f}s")
        time.sleep(0.25)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (BentoML's workers start their own sessions, so a process
    group kill of ``bentoml serve`` leaves them running)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    if sig == signal.SIGKILL:  # a crash: the whole process tree dies at once, as a pod's would
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Cluster:
    directory: Path
    replicas: int = 2
    workers: int = 1
    port: int = 8080
    base_model: str | None = None
    admin_key: str = field(default_factory=lambda: "ta-" + secrets.token_urlsafe(24))
    extra_env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 300.0
    replica_ports: list[int] = field(default_factory=list)
    postgres: PostgresServer | None = None
    moto: subprocess.Popen[bytes] | None = None
    serving: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    training: list[subprocess.Popen[bytes]] = field(default_factory=list)
    router: Router | None = None
    database_url: str = ""
    store_url: str = ""

    @property
    def url(self) -> str:
        """The router, with tenant affinity."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def round_robin_url(self) -> str:
        return f"http://127.0.0.1:{self.port + 1}"

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[i]}"

    def start(self) -> Cluster:
        self.directory = self.directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._start_postgres()
            self._start_s3()
            self.replica_ports = [free_port() for _ in range(self.replicas)]
            self.serving = [None] * self.replicas
            for i in range(self.replicas):
                self.start_replica(i, wait=False)
            for i in range(self.replicas):
                self.wait_replica(i)
            for i in range(self.workers):
                self.training.append(self._spawn(["worker"], f"worker-{i}", tailor_cli=True))
            self.router = Router(self.directory / "nginx", self.replica_ports, self.port, self.port + 1)
            self.router.start()
            wait_http(f"{self.url}/healthz", 30)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_postgres(self) -> None:
        pg_dir = self.directory / "postgres"
        if os.geteuid() == 0:
            # PostgreSQL runs as the postgres user, who may not reach into root's private
            # directories (pytest's tmp dirs are 0700): keep its data where it can.
            pg_dir = Path(tempfile.mkdtemp(prefix="tailor-cluster-pg-"))
        self.postgres = PostgresServer(pg_dir)
        self.postgres.start()
        try:
            self.postgres.sql('CREATE DATABASE "tailor"')
        except Exception as e:  # noqa: BLE001 - it exists from an earlier run
            if "already exists" not in str(e):
                raise
        self.database_url = self.postgres.url("tailor")

    def _start_s3(self) -> None:
        port = free_port()
        log = open(self.directory / "moto.log", "ab")
        self.moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **S3_KEYS})
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/moto-api/", 60, self.moto, self.directory / "moto.log")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name=S3_KEYS["AWS_DEFAULT_REGION"],
                     aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
        self.store_url = f"s3://{BUCKET}/tailor?endpoint_url={endpoint}"

    def env(self, home: Path) -> dict[str, str]:
        env = {**os.environ, **S3_KEYS, "TAILOR_HOME": str(home), "TAILOR_DATABASE_URL": self.database_url,
               "TAILOR_STORE_URL": self.store_url, "TAILOR_ADMIN_KEY": self.admin_key,
               # one worker per replica, like the Kubernetes pods: one adapter cache per affinity target
               "TAILOR_TRAIN_WORKERS": "0", "TAILOR_WORKERS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "BENTOML_DO_NOT_TRACK": "True", **self.extra_env}
        if self.base_model:
            env["TAILOR_BASE_MODEL"] = self.base_model
        return env

    def _spawn(self, args: list[str], name: str, *, tailor_cli: bool = False,
               port: int | None = None) -> subprocess.Popen[bytes]:
        """``tailor ARGS`` or ``bentoml ARGS`` with ``name``'s home; a serving ``port`` gets its own
        BentoML home (``service.instance``), so each replica's /metrics are its own."""
        home = self.directory / name
        home.mkdir(parents=True, exist_ok=True)
        bindir = Path(sys.executable).parent
        exe = bindir / ("tailor" if tailor_cli else "bentoml")
        cmd = [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "service.cli" if tailor_cli
                                                       else "bentoml", *args]
        env = self.env(home) if port is None else instance_env(self.env(home), port)
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(home / "out.log", "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_replica(self, i: int, *, wait: bool = True) -> None:
        port = self.replica_ports[i]
        self.serving[i] = self._spawn(["serve", ".", "--host", "127.0.0.1", "--port", str(port)], f"replica-{i}",
                                      port=port)
        if wait:
            self.wait_replica(i)

    def wait_replica(self, i: int) -> None:
        wait_http(f"{self.replica_url(i)}/readyz", self.ready_timeout, self.serving[i],
                  self.directory / f"replica-{i}" / "out.log")

    def kill_replica(self, i: int) -> None:
        """SIGKILL: the replica gets no chance to finish anything."""
        _stop(self.serving[i], signal.SIGKILL, 10)

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for p in [*self.serving, *self.training]:
            _stop(p)
        _stop(self.moto, timeout=10)
        if self.postgres is not None:
            if self.postgres.running:
                self.postgres.stop()
            if self.postgres.directory.name.startswith("tailor-cluster-pg-"):
                shutil.rmtree(self.postgres.directory, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.local.cluster", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up"])
    p.add_argument("--dir", type=Path, default=REPO / ".cluster")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--port", type=int, default=8080, help="router port (round robin on port + 1)")
    p.add_argument("--base-model", default=None, help="local model directory (default: bundled MiniLM)")
    args = p.parse_args(argv)
    cluster = Cluster(args.dir, replicas=args.replicas, workers=args.workers, port=args.port,
                      base_model=args.base_model,
                      **({"admin_key": os.environ["TAILOR_ADMIN_KEY"]} if os.environ.get("TAILOR_ADMIN_KEY") else {}))
    stop = False

    def _signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    print(f"starting PostgreSQL, moto (S3), {args.replicas} replicas, {args.workers} worker(s) and NGINX "
          f"under {args.dir} ...", flush=True)
    with cluster:
        print(f"router (tenant affinity): {cluster.url}\nrouter (round robin):     {cluster.round_robin_url}\n"
              f"replicas: {', '.join(cluster.replica_url(i) for i in range(args.replicas))}\n"
              f"database: {cluster.database_url}\nstore:    {cluster.store_url}\n"
              f"admin key: {cluster.admin_key}\nCtrl-C stops everything.", flush=True)
        while not stop:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
