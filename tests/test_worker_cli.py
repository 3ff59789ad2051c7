"""``tailor worker``: a training worker configured by TAILOR_* like the service, sharing one
queue with any number of others; a job whose worker died is picked up after its lease expires."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from adapters import schema
from adapters.base import tiny_base
from adapters.datasets import from_records
from adapters.jobs import shared_checkpoints
from adapters.jobs.manager import JobManager
from adapters.registry import Registry
from adapters.schema import utcnow
from adapters.store import LocalStore
from tests.postgres import wait_until
from tests.training_data import FAST_HP, sentiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    b = tiny_base(seed=1, initializer_range=0.3)
    b.model.save_pretrained(model)
    b.tokenizer.save_pretrained(model)
    Registry(f"sqlite:///{tmp_path / 'tailor.db'}").create_tenant("acme")
    return tmp_path


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "TAILOR_HOME": str(home), "TAILOR_BASE_MODEL": str(home / "model"),
            "TAILOR_TRAIN_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tailor_worker(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "tailor"
    return subprocess.run([str(exe), "worker", *args], cwd=REPO, env=env_for(home), capture_output=True,
                          text=True, timeout=timeout)


def jobs(home: Path) -> JobManager:
    return JobManager(Registry(f"sqlite:///{home / 'tailor.db'}").engine, LocalStore(home / "store"))


def lease_expired(jm: JobManager, job_id: str) -> bool:
    """What a worker's recovery checks: the job's lease, as the database holds it, has passed."""
    with jm.db.connect() as conn:
        expires = conn.execute(select(schema.jobs.c.lease_expires_at).where(schema.jobs.c.id == job_id)).scalar_one()
    return expires is not None and expires < utcnow()


def test_tailor_worker_trains_a_queued_job(home):
    job = jobs(home).submit("acme", "mood", training=from_records(sentiment(60)), hyperparameters=FAST_HP)
    done = tailor_worker(home, "--once")
    assert done.returncode == 0, done.stderr[-3000:]
    got = jobs(home).get("acme", job.id)
    assert got.status == "succeeded", (got.error_code, got.error_message, done.stderr[-3000:])
    assert got.version == 1
    assert Registry(f"sqlite:///{home / 'tailor.db'}").resolve("acme", "mood").version == 1


def test_a_dead_workers_job_is_picked_up_after_its_lease(home):
    """The first worker runs on "another node" (its own checkpoint folder) and dies; ``tailor
    worker`` resumes the job from the checkpoint the first one shared through the store."""
    jm = jobs(home)
    job = jm.submit("acme", "durable", training=from_records(sentiment(120)),
                    hyperparameters={**FAST_HP, "epochs": 8, "batch_size": 4})
    shared = f"{shared_checkpoints.prefix('acme', job.id)}state.json"
    first = subprocess.Popen(
        [sys.executable, "-m", "adapters.jobs.worker", "--database-url", f"sqlite:///{home / 'tailor.db'}",
         "--store-url", str(home / "store"), "--checkpoints", str(home / "node-a-checkpoints"),
         "--base-model", str(home / "model"), "--threads", "1", "--lease-seconds", "2",
         "--heartbeat-seconds", "0.2"],
        cwd=REPO, env=env_for(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not jm.store.exists(shared):
            assert first.poll() is None, "the first worker exited early"
            assert time.monotonic() < deadline, "no checkpoint was shared"
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert jm.get("acme", job.id).status == "running"  # nobody knows yet that its worker is gone
    assert not (home / "checkpoints" / job.id).exists()
    wait_until(lambda: lease_expired(jm, job.id), timeout=30, interval=0.05)  # the lease was 2 s
    done = tailor_worker(home, "--once")  # checkpoints in $TAILOR_HOME/checkpoints: another "node"
    assert done.returncode == 0, done.stderr[-3000:]
    got = jm.get("acme", job.id)
    assert got.status == "succeeded" and got.attempts == 2, (got.status, done.stderr[-3000:])
    assert "lease expired" in done.stderr
    messages = [e.message for e in jm.events("acme", job.id)]
    assert any("resuming from its checkpoint in the store" in m for m in messages), messages
    assert any("resumed from the checkpoint after epoch" in m for m in messages)
    # the job is over: its checkpoints are gone, here and in the store
    assert jm.store.list(shared_checkpoints.prefix("acme", job.id)) == []
    assert not (home / "checkpoints" / job.id).exists()


def test_tailor_worker_refuses_bad_settings(tmp_path):
    env = {**os.environ, "TAILOR_HOME": str(tmp_path), "TAILOR_BASE_MODEL": str(tmp_path / "nope")}
    exe = Path(sys.executable).parent / "tailor"
    done = subprocess.run([str(exe), "worker", "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "TAILOR_BASE_MODEL" in done.stderr and "not a directory" in done.stderr
