"""A real ``bentoml serve .`` process on a free port, over a tiny random base saved to disk.

``served`` (session-scoped) starts it with its own TAILOR_HOME (SQLite file + store), waits
for ``/readyz``, yields a ``Served`` and stops it with SIGTERM. Server output goes to
``serve.log`` in its home and is printed when the start fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key-0123456789"
READY_TIMEOUT_S = 90.0
LIMITS = {
    "TAILOR_MAX_INPUTS": "16",
    "TAILOR_MAX_INPUT_CHARS": "2000",
    "TAILOR_MAX_BODY_BYTES": str(1 << 20),
    "TAILOR_MAX_UPLOAD_BYTES": str(4 << 20),
}


@dataclass
class Served:
    url: str
    home: Path
    model_dir: Path
    admin_key: str = ADMIN_KEY
    env: dict[str, str] = field(default_factory=dict)

    def client(self, key: str | None = None, **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0, **kw)  # type: ignore[arg-type]

    def log_tail(self, n: int = 80) -> str:
        path = self.home / "serve.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_base(directory: Path, seed: int = 7) -> Path:
    from adapters.base import tiny_base

    b = tiny_base(seed=seed)
    b.model.save_pretrained(directory)
    b.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served")
    model_dir = save_tiny_base(root / "model")
    home = root / "home"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ, "TAILOR_HOME": str(home), "TAILOR_BASE_MODEL": str(model_dir),
        "TAILOR_ADMIN_KEY": ADMIN_KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TAILOR_TRAIN_WORKERS": "0", "TAILOR_MAX_WAIT_MS": "25",
        "BENTOML_DO_NOT_TRACK": "True", **LIMITS,
    }
    exe = Path(sys.executable).parent / "bentoml"
    bentoml = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bentoml"]
    log = open(home / "serve.log", "wb")
    proc = subprocess.Popen([*bentoml, "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    s = Served(url=f"http://127.0.0.1:{port}", home=home, model_dir=model_dir, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{s.log_tail()}")
            try:
                if httpx.get(f"{s.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"service not ready after {READY_TIMEOUT_S:.0f}s:\n{s.log_tail()}")
            time.sleep(0.25)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
