"""A real ``bentoml serve .`` process on a free port, over a tiny random base saved to disk.

``served`` (session-scoped) starts it with its own TAILOR_HOME (SQLite file + store), waits
for ``/readyz``, yields a ``Served`` and stops it with SIGTERM. It serves both tasks: text on
the tiny base saved to ``model_dir``, images on the tiny random vision base
(``TAILOR_IMAGE_BASE_MODEL=tiny:IMAGE_BASE_SEED``; ``image_base()`` is the same base in this
process). Server output goes to
``serve.log`` in its home and is printed when the start fails.

The session fixtures here are registered once, as a plugin (``tests/conftest.py``): a test
module asks for them by name and must not import them (an imported fixture is a fixture of that
module: a session-scoped server would start again for every module that imports it, and each
would live until the session ends). A whole run starts each of them at most once, so the tests
that share one make their own tenants (names no other test uses) and assert on what they made,
never on the server's totals (``/metrics`` deltas, not values).

``start_served(home, model_dir, overrides)`` / ``stop_served(s)`` (or ``with serving(...)``)
do the same for tests that need other settings (several workers, training workers) or that
stop a service and start it again on the same home. ``served_generation`` (session-scoped,
used only by the generation tests) also serves text generation on the tiny random Llama
(``TAILOR_GENERATION_BASE_MODEL=tiny:GENERATION_BASE_SEED``; ``generation_base()`` is the same
base in this process) with a 1 MiB KV cache (2,048 tokens of it) and a 1 s admission wait, so a
long sequence makes the next request wait and be refused with Retry-After. ``served_training``
(session-scoped) has one training worker, over a tiny base that trains in seconds
(``TRAINABLE``); a test that starts jobs on it waits for them to end (or cancels them), so the
next test's jobs do not queue behind them. ``served_text_only`` (session-scoped) serves text
classification alone (no vision base), writes BentoML's access log (a line per request) and has
no training worker: jobs stay queued, and no test but the queue-position one submits jobs to it. Each instance gets its own BentoML home
(``service.instance``), so its ``/metrics`` are its own: none is shared with another test's
server or a service running beside the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.instance import instance_env

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key-0123456789"
READY_TIMEOUT_S = 90.0
LIMITS = {
    "TAILOR_MAX_INPUTS": "16",
    "TAILOR_MAX_INPUT_CHARS": "2000",
    "TAILOR_MAX_BODY_BYTES": str(1 << 20),
    "TAILOR_MAX_UPLOAD_BYTES": str(4 << 20),
    "TAILOR_MAX_IMAGES": "4",
    "TAILOR_MAX_IMAGE_BYTES": str(64 << 10),
    "TAILOR_MAX_IMAGE_PIXELS": str(1 << 20),
}
IMAGE_BASE_SEED = 5
GENERATION_BASE_SEED = 3
BASES_CACHE = Path(tempfile.gettempdir()) / "tailor-test-bases"  # SmolLM2's tokenizer, converted once
TRAINABLE = {"seed": 1, "initializer_range": 0.3}  # save_tiny_base(dir, **TRAINABLE): trains in seconds
# text classification alone, and BentoML's access log on (tests/test_service_logging.py reads it)
TEXT_ONLY = {"TAILOR_TASKS": "text-classification", "TAILOR_IMAGE_BASE_MODEL": "", "TAILOR_ACCESS_LOG": "1"}
GENERATION = {
    "TAILOR_TASKS": "text-classification,text-generation",
    "TAILOR_GENERATION_BASE_MODEL": f"tiny:{GENERATION_BASE_SEED}",
    "TAILOR_GENERATION_KV_CACHE_BYTES": str(1 << 20),
    "TAILOR_GENERATION_ADMISSION_TIMEOUT_S": "1",
}


@dataclass
class Served:
    url: str
    home: Path
    model_dir: Path
    admin_key: str = ADMIN_KEY
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_file: Any = field(default=None, repr=False)

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


def save_tiny_base(directory: Path, seed: int = 7, **config: Any) -> Path:
    """A tiny random base saved as a model folder (``config``: e.g. ``initializer_range=0.3``
    for one that trains in seconds)."""
    from adapters.base import tiny_base

    b = tiny_base(seed=seed, **config)
    b.model.save_pretrained(directory)
    b.tokenizer.save_pretrained(directory)
    return directory


def image_base() -> Any:
    """The vision base a served process loads (``TAILOR_IMAGE_BASE_MODEL=tiny:IMAGE_BASE_SEED``)."""
    from adapters.vision.backbone import tiny_vision_base

    return tiny_vision_base(IMAGE_BASE_SEED)


def serve_env(home: Path, model_dir: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a served process: this one's, the test defaults, then ``overrides``."""
    return {
        **os.environ, "TAILOR_HOME": str(home), "TAILOR_BASE_MODEL": str(model_dir),
        "TAILOR_IMAGE_BASE_MODEL": f"tiny:{IMAGE_BASE_SEED}",
        "TAILOR_ADMIN_KEY": ADMIN_KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TAILOR_TRAIN_WORKERS": "0", "TAILOR_WORKERS": "1",
        "TAILOR_MAX_WAIT_MS": "25",
        "BENTOML_DO_NOT_TRACK": "True", **LIMITS, **(overrides or {}),
    }


def bentoml_serve() -> list[str]:
    """The command line that serves this checkout: ``bentoml serve .``."""
    exe = Path(sys.executable).parent / "bentoml"
    return [*([str(exe)] if exe.is_file() else [sys.executable, "-m", "bentoml"]), "serve", "."]


def start_served(home: Path, model_dir: Path, overrides: dict[str, str] | None = None, *,
                 port: int | None = None, ready_timeout: float = READY_TIMEOUT_S,
                 command: list[str] | None = None) -> Served:
    """Start ``bentoml serve .`` (or ``command``, given ``--host``/``--port``) on ``home``
    (created if missing) with its own BentoML home, and wait for ``/readyz``.

    Fails the test (after stopping the process) when it exits or is not ready in time.
    ``serve.log`` in ``home`` is appended to, so a restart on the same home keeps both logs.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = instance_env(serve_env(home, model_dir, overrides), port)
    log = open(home / "serve.log", "ab")
    proc = subprocess.Popen([*(command or bentoml_serve()), "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    s = Served(url=f"http://127.0.0.1:{port}", home=home, model_dir=model_dir, env=env, proc=proc, log_file=log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{s.log_tail()}")
            try:
                if httpx.get(f"{s.url}/readyz", timeout=2).status_code == 200:
                    return s
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"service not ready after {ready_timeout:.0f}s:\n{s.log_tail()}")
            time.sleep(0.25)
    except BaseException:
        stop_served(s)
        raise


def stop_served(s: Served, timeout: float = 30.0) -> int | None:
    """SIGTERM the served process (SIGKILL its whole group after ``timeout``); its exit status."""
    proc = s.proc
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # its workers (serving and training) leave with it; make sure, before a restart on this home
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.05)
    if s.log_file is not None:
        s.log_file.close()
    return proc.returncode


@contextmanager
def serving(home: Path, model_dir: Path, overrides: dict[str, str] | None = None, **kw: Any) -> Iterator[Served]:
    s = start_served(home, model_dir, overrides, **kw)
    try:
        yield s
    finally:
        stop_served(s)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served")
    model_dir = save_tiny_base(root / "model")
    with serving(root / "home", model_dir) as s:
        yield s


def generation_base() -> Any:
    """The causal base ``served_generation`` loads (``tiny:GENERATION_BASE_SEED``), built here."""
    from adapters.generation.base import tiny_causal_base

    return tiny_causal_base(GENERATION_BASE_SEED, cache_dir=BASES_CACHE)


def seed_bases(home: Path) -> None:
    """Give ``home`` the tokenizer the tiny causal base needs (``TAILOR_HOME/bases``), copied from
    this machine's test cache instead of converted again from the GGUF by the served process."""
    from adapters.generation.base import tokenizer_cache

    folder = tokenizer_cache(BASES_CACHE)
    shutil.copytree(folder, home / "bases" / folder.name, dirs_exist_ok=True)


@pytest.fixture(scope="session")
def served_generation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served-generation")
    model_dir = save_tiny_base(root / "model")
    seed_bases(root / "home")
    with serving(root / "home", model_dir, GENERATION, ready_timeout=2 * READY_TIMEOUT_S) as s:  # two bases
        yield s


@pytest.fixture(scope="session")
def served_training(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served-training")
    model_dir = save_tiny_base(root / "model", **TRAINABLE)
    with serving(root / "home", model_dir, {"TAILOR_TRAIN_WORKERS": "1"}, ready_timeout=240) as s:  # a busy CI box
        yield s


@pytest.fixture(scope="session")
def served_text_only(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served-text-only")
    model_dir = save_tiny_base(root / "model", seed=8)
    with serving(root / "home", model_dir, TEXT_ONLY) as s:
        yield s
