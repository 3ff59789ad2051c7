"""Job lifecycle in the database: submit, claim, leases, cancel, recovery, tenant isolation.

Every test runs on SQLite and on PostgreSQL (the ``database_url`` fixture)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest

from adapters.datasets import from_records
from adapters.errors import ConflictError, NotFoundError
from adapters.jobs.manager import JobLimitError, JobManager, LostJobError
from adapters.jobs.supervisor import local_worker_dead
from adapters.registry import Registry
from adapters.schema import utcnow
from adapters.store import LocalStore

DATA = [{"text": f"good {i}", "label": "pos"} for i in range(5)] + [
    {"text": f"bad {i}", "label": "neg"} for i in range(5)
]


LEASE_S = 60.0


class Clock:
    """The manager's clock, moved by the test: leases run out without waiting. Each reading is
    one microsecond after the last, so jobs keep their submit order."""

    def __init__(self) -> None:
        self._now = utcnow()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self._now += timedelta(microseconds=1)
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def jm(tmp_path, database_url, clock):
    reg = Registry(database_url)
    reg.create_tenant("acme", quotas={"max_concurrent_jobs": 1, "max_active_jobs": 3})
    reg.create_tenant("globex")
    return JobManager(reg.engine, LocalStore(tmp_path / "store"), lease_seconds=LEASE_S, clock=clock)


def submit(jm, tenant="acme", adapter="sent", **kw):
    return jm.submit(tenant, adapter, training=from_records(DATA), **kw)


def test_submit_stores_data_and_starts_queued(jm):
    job = submit(jm)
    assert job.status == "queued" and job.id.startswith("ftjob-")
    assert job.dataset["training_examples"] == 10 and job.dataset["labels"] == ["neg", "pos"]
    assert jm.store.exists(job.training_key)
    assert [e.message for e in jm.events("acme", job.id)][0].startswith("job created")


def test_invalid_method_promote_or_hyperparameters_create_nothing(jm):
    for kw in ({"method": "magic"}, {"promote": "sometimes"}, {"hyperparameters": {"epochs": -1}},
               {"hyperparameters": {"learning_rte": 0.1}}):
        with pytest.raises(ValueError):
            submit(jm, **kw)
    assert jm.list("acme") == []
    assert jm.store.list("tenants/acme/") == []


def test_active_job_quota(jm):
    for _ in range(3):
        submit(jm)
    with pytest.raises(JobLimitError, match="quota is 3"):
        submit(jm)
    assert len(jm.list("acme")) == 3
    assert len(jm.store.list("tenants/acme/jobs/")) == 3  # the refused job left no data behind


def test_tenants_see_only_their_jobs(jm):
    job = submit(jm)
    with pytest.raises(NotFoundError):
        jm.get("globex", job.id)
    with pytest.raises(NotFoundError):
        jm.cancel("globex", job.id)
    with pytest.raises(NotFoundError):
        jm.events("globex", job.id)
    with pytest.raises(NotFoundError):
        jm.get("acme", "../../etc/passwd")
    assert jm.list("globex") == []


def test_claim_is_exclusive_under_contention(jm):
    jobs = [submit(jm, tenant="globex", adapter=f"a{i}") for i in range(3)]
    jm.db.dispose()
    claimed: list[str] = []
    lock = threading.Lock()

    def grab(w: int) -> None:
        while True:
            job = jm.claim(f"w{w}")
            if job is None:
                return
            with lock:
                claimed.append(job.id)
            jm.succeed(job.id, f"w{w}", version=1, metrics={}, result={}, message="done")

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j.id for j in jobs)  # every job once, none twice


def test_per_tenant_concurrency_limit(jm):
    a1, a2 = submit(jm, adapter="x"), submit(jm, adapter="y")
    g1 = submit(jm, tenant="globex")
    first = jm.claim("w1")
    assert first.id == a1.id and first.status == "validating" and first.attempts == 1
    second = jm.claim("w2")
    assert second.id == g1.id  # acme is at its limit of 1, so globex goes first
    assert jm.claim("w3") is None
    jm.fail(a1.id, "w1", "boom", "exploded")
    assert jm.claim("w3").id == a2.id


def test_cancel_queued_is_immediate_and_running_is_flagged(jm):
    queued = submit(jm)
    job = jm.cancel("acme", queued.id)
    assert job.status == "cancelled" and job.finished_at is not None
    with pytest.raises(ConflictError):
        jm.cancel("acme", queued.id)
    running = submit(jm)
    jm.claim("w1")
    assert jm.heartbeat(running.id, "w1") is False
    assert jm.cancel("acme", running.id).status == "validating"
    assert jm.heartbeat(running.id, "w1") is True
    jm.mark_cancelled(running.id, "w1")
    assert jm.get("acme", running.id).status == "cancelled"


def test_recover_requeues_then_fails_after_max_attempts(jm, clock):
    job = submit(jm)
    for attempt in (1, 2, 3):
        claimed = jm.claim(f"w{attempt}")
        assert claimed.id == job.id and claimed.attempts == attempt
        clock.advance(LEASE_S - 1)
        assert jm.recover(max_attempts=3) == []  # the lease still holds
        clock.advance(2)  # the lease runs out: the worker is presumed dead
        assert jm.recover(max_attempts=3) == [job.id]
    final = jm.get("acme", job.id)
    assert final.status == "failed" and final.error.code == "worker_lost"
    messages = [e.message for e in jm.events("acme", job.id)]
    assert sum("requeued" in m for m in messages) == 2


def test_heartbeat_renews_the_lease(jm, clock):
    job = submit(jm)
    jm.claim("w1")
    for _ in range(3):  # three leases' worth of time, each renewed before it ran out
        clock.advance(LEASE_S - 1)
        assert jm.heartbeat(job.id, "w1") is False
        assert jm.recover() == []
    clock.advance(LEASE_S - 1)
    assert jm.recover() == []
    clock.advance(2)  # no heartbeat for longer than the lease
    assert jm.recover() == [job.id]
    assert jm.get("acme", job.id).status == "queued"
    with pytest.raises(LostJobError):
        jm.heartbeat(job.id, "w1")


def test_a_worker_that_lost_its_job_cannot_write(jm, clock):
    job = submit(jm)
    jm.claim("old")
    clock.advance(LEASE_S + 1)
    assert jm.recover() == [job.id]
    assert jm.claim("new").id == job.id
    with pytest.raises(LostJobError):
        jm.heartbeat(job.id, "old")
    with pytest.raises(LostJobError):
        jm.succeed(job.id, "old", version=1, metrics={}, result={}, message="stale")
    jm.succeed(job.id, "new", version=1, metrics={"val_accuracy": 1.0}, result={}, message="ok")
    assert jm.get("acme", job.id).status == "succeeded"


def test_recover_detects_dead_local_process(jm):
    import socket
    import subprocess
    import sys

    job = submit(jm)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead_id = f"{socket.gethostname()}:{p.pid}:abcd"
    jm.claim(dead_id)
    jm.heartbeat(job.id, dead_id)  # lease still valid, but the process is gone
    assert local_worker_dead(dead_id) and not local_worker_dead(f"{socket.gethostname()}:1:x")
    assert jm.recover(is_dead=local_worker_dead) == [job.id]
    assert jm.get("acme", job.id).status == "queued"


def test_durations_count_finished_jobs_that_ran(jm):
    from datetime import timedelta

    from sqlalchemy import update

    from adapters import schema
    from adapters.schema import utcnow

    ran = {}
    for adapter, seconds in (("a", 42.5), ("b", 3.0), ("c", 7200.0)):
        job = submit(jm, tenant="globex", adapter=adapter)
        assert jm.claim("w1").id == job.id
        ran[job.id] = seconds
        if adapter == "c":
            jm.fail(job.id, "w1", "boom", "exploded")
        else:
            jm.succeed(job.id, "w1", version=1, metrics={}, result={}, message="ok")
    never_started = submit(jm)
    jm.cancel("acme", never_started.id)  # cancelled while queued: it never ran, so it is not counted
    submit(jm)  # still queued: not counted either
    start = utcnow()
    with jm.db.begin() as conn:
        for job_id, seconds in ran.items():
            conn.execute(update(schema.jobs).where(schema.jobs.c.id == job_id)
                         .values(started_at=start, finished_at=start + timedelta(seconds=seconds)))
    by_status = {d.status: d for d in jm.durations([10.0, 60.0, 3600.0])}
    assert set(by_status) == {"succeeded", "failed"}
    ok, failed = by_status["succeeded"], by_status["failed"]
    assert ok.count == 2 and ok.at_most == (1, 2, 2) and ok.total_seconds == pytest.approx(45.5, abs=0.01)
    assert failed.count == 1 and failed.at_most == (0, 0, 0) and failed.total_seconds == pytest.approx(7200, abs=0.01)
