"""A cancel the API accepted before a job published anything ends it ``cancelled``, whatever the
heartbeat thread has seen by then: the runner asks the database once more before it publishes
and before it records a training error. And the heartbeat reads the cancel flag even when its
lease write cannot get through (on SQLite a busy worker's own event writes hold that lock).

Real parts: a SQLite file, a local store, the tiny random base, ``run_job`` in this process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.datasets import from_records
from adapters.errors import DatabaseUnavailableError
from adapters.jobs.heartbeat import Heartbeat
from adapters.jobs.manager import JobManager
from adapters.jobs.runner import WorkerContext, run_job
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from tests.training_data import FAST_HP, sentiment


class CancelOnEvent(JobManager):
    """A real JobManager that requests a cancel of the job (as the API would) when the worker
    writes its first event whose data says ``when`` (e.g. the first training step)."""

    def __init__(self, *a, tenant: str, when: str, **kw):
        super().__init__(*a, **kw)
        self.tenant, self.when, self.requested = tenant, when, threading.Event()

    def event(self, job_id, level, message, **kw):
        super().event(job_id, level, message, **kw)
        if self.when in (kw.get("data") or {}) and not self.requested.is_set():
            self.requested.set()
            assert self.get(self.tenant, job_id).cancel_requested is False  # not yet: this is the request
            self.cancel(self.tenant, job_id)


@pytest.fixture
def world(tmp_path: Path):
    registry = Registry(f"sqlite:///{tmp_path}/tailor.db")
    registry.create_tenant("acme")
    store = LocalStore(tmp_path / "store")
    return registry, store, Catalog(registry, store)


def context(jobs: JobManager, catalog: Catalog, tmp_path: Path) -> WorkerContext:
    def base():  # the trainer's and the engine's: one each (the engine wraps its base's layers)
        return tiny_base(seed=1, initializer_range=0.3)

    # a heartbeat that never beats while the job runs: only the runner's own checks can see the cancel
    return WorkerContext(manager=jobs, catalog=catalog, trainer_base=base(), engine=Engine(base(), catalog),
                         worker_id="w1", checkpoint_root=tmp_path / "ckpt", threads=1, heartbeat_seconds=3600)


def test_a_cancel_the_heartbeat_never_saw_still_stops_the_publish(world, tmp_path):
    registry, store, catalog = world
    jobs = CancelOnEvent(registry.engine, store, tenant="acme", when="train_loss")
    jobs.submit("acme", "mood", training=from_records(sentiment(40)), hyperparameters={**FAST_HP, "epochs": 2})
    job = jobs.claim("w1")
    assert run_job(job, context(jobs, catalog, tmp_path)) == "cancelled"
    assert jobs.requested.is_set()
    done = jobs.get("acme", job.id)
    assert done.status == "cancelled" and done.version is None
    assert not any(a.versions for a in registry.list_adapters("acme"))  # nothing was registered
    assert not (tmp_path / "ckpt" / job.id).exists()
    # the run itself trained to its end: the cancel was honoured at the publish, not mid-run
    assert any(e.message.startswith("epoch 2/2") for e in jobs.events("acme", job.id))


def run_diverging(world, tmp_path: Path, when: str) -> tuple[CancelOnEvent, str, str]:
    """Run a job that diverges (learning rate 1.0, as tests/test_service_training.py's "broken"
    job), with a cancel requested at the first event carrying ``when``; (manager, job id, status)."""
    registry, store, catalog = world
    jobs = CancelOnEvent(registry.engine, store, tenant="acme", when=when)
    jobs.submit("acme", "broken", training=from_records(sentiment(40)),
                hyperparameters={**FAST_HP, "learning_rate": 1.0})
    job = jobs.claim("w1")
    return jobs, job.id, run_job(job, context(jobs, catalog, tmp_path))


def test_a_training_error_after_a_cancel_ends_the_job_cancelled_and_says_why(world, tmp_path):
    jobs, job_id, status = run_diverging(world, tmp_path, when="train_loss")
    assert status == "cancelled"
    done = jobs.get("acme", job_id)
    assert done.status == "cancelled" and done.error is None, done
    said = [e.message for e in jobs.events("acme", job_id)]
    assert any("training_diverged" in m and "while being cancelled" in m for m in said), said[-5:]
    registry = world[0]
    assert not any(a.versions for a in registry.list_adapters("acme"))


def test_without_a_cancel_the_same_error_fails_the_job(world, tmp_path):
    jobs, job_id, status = run_diverging(world, tmp_path, when="never-written")
    assert status == "failed"
    assert jobs.get("acme", job_id).error.code == "training_diverged"


class LeaseWritesFail(JobManager):
    """The lease renewal cannot get through (as when another connection holds SQLite's write lock
    past the busy timeout); reads still work."""

    def heartbeat(self, job_id, worker_id):
        raise DatabaseUnavailableError("the registry database is unavailable: database is locked")


def test_the_heartbeat_sees_a_cancel_while_its_lease_writes_fail(world):
    registry, store, _ = world
    jobs = LeaseWritesFail(registry.engine, store)
    jobs.submit("acme", "mood", training=from_records(sentiment(20)), hyperparameters=FAST_HP)
    job = jobs.claim("w1")
    with Heartbeat(jobs, job.id, "w1", interval=0.05) as hb:
        assert not hb.should_stop()
        jobs.cancel("acme", job.id)
        assert hb.cancelled.wait(30), "the heartbeat never read the cancel"
        assert hb.should_stop() and not hb.lost.is_set()
