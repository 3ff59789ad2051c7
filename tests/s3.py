"""A throwaway S3 server (moto's server mode) for tests and local scripts, plus a TCP proxy
that can cut it off.

* ``start_moto(port=None) -> (endpoint_url, stop)`` runs ``python -m moto.server`` from this
  interpreter on 127.0.0.1 (a free port unless one is given), waits until it answers and
  returns its url and a ``stop()`` that terminates it (and is safe to call twice). moto keeps
  everything in memory: a restarted server is empty.
* ``S3_TEST_ENV``: dummy credentials and region; moto accepts any.
* ``moto_endpoint`` (session fixture): one server for the whole run, shared by every test
  module that imports the fixture, stopped when the session ends.
* ``s3_env`` (function fixture): ``S3_TEST_ENV`` set with ``monkeypatch`` (and stray AWS
  settings removed) for one test only, so no credentials leak into other tests.
* ``s3_url(endpoint, bucket="tailor-test", prefix=None)``: a store url on a fresh prefix.
* ``TcpProxy(host, port)``: forwards a local port to the server; ``mode`` switches it to
  ``"reset"`` (accept, close at once), ``"hang"`` (accept, never answer) or ``"http503"``
  (answer every request with 503) to inject faults without touching the server's data.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
BUCKET = "tailor-test"
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
# Settings from a developer's shell that would send the clients elsewhere or change signing.
_STRAY_AWS_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                  "AWS_ENDPOINT_URL_S3", "TAILOR_S3_ENDPOINT_URL", "AWS_REGION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int | None = None, *, log_path: Path | None = None,
               timeout: float = START_TIMEOUT_S) -> tuple[str, Callable[[], None]]:
    """Start moto's S3 server on 127.0.0.1; returns its endpoint url and a stop function."""
    port = port or free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="moto-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **S3_TEST_ENV})
    endpoint = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            stop()
            raise RuntimeError(f"moto server exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"moto server not answering on {endpoint} after {timeout:.0f}s")
        time.sleep(0.05)
    return endpoint, stop


def s3_url(endpoint: str, bucket: str = BUCKET, prefix: str | None = None, **options: str) -> str:
    """A store url on ``bucket`` under ``prefix`` (a fresh one by default), created if missing."""
    prefix = prefix if prefix is not None else f"t-{uuid.uuid4().hex[:12]}"
    query = "&".join(f"{k}={v}" for k, v in {"endpoint_url": endpoint, "create_bucket": "1", **options}.items())
    return f"s3://{bucket}/{prefix}?{query}" if prefix else f"s3://{bucket}?{query}"


# One server per pytest session however many modules import the fixture (each import makes
# its own fixture definition; session teardown stops it after the last one).
_shared: dict[str, object] = {"users": 0}
_shared_lock = threading.Lock()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    pytest.importorskip("moto")
    with _shared_lock:
        if not _shared["users"]:
            _shared["endpoint"], _shared["stop"] = start_moto()
        _shared["users"] = int(_shared["users"]) + 1  # type: ignore[call-overload]
    try:
        yield str(_shared["endpoint"])
    finally:
        with _shared_lock:
            _shared["users"] = int(_shared["users"]) - 1  # type: ignore[call-overload]
            if not _shared["users"]:
                _shared.pop("stop")()  # type: ignore[operator]


@pytest.fixture()
def s3_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> str:
    """Dummy credentials for this test only; returns the moto endpoint."""
    for name in _STRAY_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in S3_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    return moto_endpoint


class TcpProxy:
    """127.0.0.1:<port> -> target, with switchable faults (see the module docstring)."""

    MODES = ("forward", "reset", "hang", "http503")

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._mode = "forward"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    @classmethod
    def to(cls, url: str) -> TcpProxy:
        host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
        return cls(host, int(port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(mode)
        with self._lock:
            self._mode = mode
            doomed, self._conns = self._conns, set()
        for s in doomed:  # pooled keep-alive connections must see the change too
            _close(s)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.mode = "forward"

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.update(socks)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self._mode
            if mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                _close(client)
            elif mode == "hang":
                self._track(client)
            elif mode == "http503":
                threading.Thread(target=self._answer_503, args=(client,), daemon=True).start()
            else:
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    _close(client)
                    continue
                self._track(client, upstream)
                threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _answer_503(self, client: socket.socket) -> None:
        self._track(client)
        try:
            client.settimeout(5)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = client.recv(65536)
                if not chunk:
                    return
                buf += chunk
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                           b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        finally:
            _close(client)

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 30)
                if not ready:
                    continue
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            _close(a)
            _close(b)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
