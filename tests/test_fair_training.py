"""Fair training across tenants (``adapters.jobs.fair_share``): the claim order, the queue
position, yielding a worker at a checkpoint and resuming from it exactly, on SQLite and
PostgreSQL, and end to end with a real worker process: a small job of one tenant runs before
another tenant's long job has finished, and the long job then resumes and succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from adapters.base import tiny_base
from adapters.datasets import from_records
from adapters.jobs import shared_checkpoints
from adapters.jobs.fair_share import (
    FairShare, QueuedJob, TenantClock, YieldCheck, contender, describe_position, queue_order, tenant_order,
)
from adapters.jobs.manager import JobManager, LostJobError
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.training import Hyperparameters, TrainCallbacks, train
from adapters.training.trainer import TrainingYielded
from tests.postgres import wait_until
from tests.training_data import FAST_HP, sentiment

REPO = Path(__file__).resolve().parents[1]
LABELS = ("neg", "pos")
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- the rule, as plain data ------------------------------------------------------------------


def clock(tid: int, *, on_worker: int = 0, released: float | None = None, first: float = 0.0,
          since: float | None = None) -> TenantClock:
    return TenantClock(tenant_id=tid, tenant=f"t{tid}", on_worker=on_worker,
                       last_released=None if released is None else at(released), first_queued=at(first),
                       waiting_since=at(first if since is None else since))


def test_tenant_order_serves_the_least_recently_served_tenant_first():
    clocks = [
        clock(1, on_worker=1, first=0),  # holds a worker now: last
        clock(2, released=50, first=1),
        clock(3, released=10, first=2),
        clock(4, first=30),  # never had a worker: first ...
        clock(5, first=20),  # ... and of two such, the one waiting longer goes first
    ]
    assert [c.tenant_id for c in tenant_order(clocks)] == [5, 4, 3, 2, 1]


def test_queue_order_is_round_robin_over_tenants_in_clock_order():
    jobs = [QueuedJob("a1", 1, at(0)), QueuedJob("a2", 1, at(1)), QueuedJob("a3", 1, at(2)),
            QueuedJob("b1", 2, at(5)), QueuedJob("c1", 3, at(6)), QueuedJob("c2", 3, at(7))]
    clocks = {1: clock(1, released=100, first=0), 2: clock(2, first=5), 3: clock(3, released=50, first=6)}
    assert [j.id for j in queue_order(jobs, clocks)] == ["b1", "c1", "a1", "c2", "a2", "a3"]


def test_contender_is_another_tenant_without_a_worker_that_waited_past_the_grace():
    now = at(100)
    mine = clock(1, on_worker=1)
    assert contender([mine], 1, now, 2.0) is None  # only my own tenant
    busy = clock(2, on_worker=1, since=0)  # has a worker already: not owed mine
    fresh = clock(3, since=99.5)  # an idle worker is about to take it
    assert contender([mine, busy, fresh], 1, now, 2.0) is None
    waiting = clock(4, since=90)
    found = contender([mine, busy, fresh, waiting], 1, now, 2.0)
    assert found is not None and found.tenant == "t4" and found.waited_seconds == 10.0
    assert contender([mine, waiting], 4, now, 2.0) is None  # tenant 4's own job never yields to itself


def test_position_lines_never_name_another_tenant():
    ahead = [QueuedJob("ftjob-x", 2, at(0)), QueuedJob("ftjob-mine", 1, at(1)), QueuedJob("ftjob-y", 3, at(2))]
    assert describe_position(1, [], 1) == "queued: position 1, next for a free training worker"
    assert describe_position(2, ahead[:1], 1) == "queued: position 2, waiting behind another tenant's job"
    line = describe_position(4, ahead, 1)
    assert line == "queued: position 4, waiting behind 2 jobs of other tenants and your job ftjob-mine"
    assert "t2" not in line and "t3" not in line


def test_yield_check_asks_after_the_minimum_turn_and_mid_epoch_only_after_a_slice():
    now = [0.0]
    asked: list[float] = []
    answer: list[object] = [None]

    def find():
        asked.append(now[0])
        return answer[0]

    check = YieldCheck(FairShare(min_turn_seconds=10, slice_seconds=60, check_seconds=1), find,
                       clock=lambda: now[0])
    assert check(True) is False and asked == []  # the turn is too young to end
    now[0] = 10.0
    assert check(True) is False and asked == [10.0]  # from then on every epoch end asks
    now[0] = 59.0
    assert check(False) is False and asked == [10.0]  # mid-epoch: not before the slice is over
    answer[0] = contender([clock(2, since=0)], 1, at(100), 2.0)
    now[0] = 60.0
    assert check(False) is True and asked == [10.0, 60.0]
    now[0] = 60.5
    assert check(False) is True and asked == [10.0, 60.0]  # at most one read per check_seconds
    assert check.found is not None and check.found.tenant == "t2"
    off = YieldCheck(FairShare(yield_worker=False), find, clock=lambda: now[0])
    assert off(True) is False and asked == [10.0, 60.0]


# -- claim order and yielding in the database (SQLite and PostgreSQL) -------------------------


@pytest.fixture()
def jm(tmp_path: Path, database_url: str) -> JobManager:
    reg = Registry(database_url)
    for name in ("acme", "globex", "initech"):
        reg.create_tenant(name, quotas={"max_concurrent_jobs": 1, "max_active_jobs": 5})
    return JobManager(reg.engine, LocalStore(tmp_path / "store"), lease_seconds=30)


def submit(jm: JobManager, tenant: str, adapter: str = "a"):
    return jm.submit(tenant, adapter, training=from_records(sentiment(10)))


def test_claims_take_turns_across_tenants(jm):
    """acme queues three jobs before globex and initech queue one each: the workers do not run
    acme's three first."""
    a = [submit(jm, "acme", f"a{i}") for i in range(3)]
    g, i = submit(jm, "globex"), submit(jm, "initech")
    assert [jm.get("acme", j.id).queue_position for j in a] == [1, 4, 5]
    assert (jm.get("globex", g.id).queue_position, jm.get("initech", i.id).queue_position) == (2, 3)
    order = []
    for _ in range(5):
        job = jm.claim("w1")
        assert job is not None and job.queue_position is None
        order.append(job.id)
        jm.succeed(job.id, "w1", version=1, metrics={}, result={}, message="done")
    assert order == [a[0].id, g.id, i.id, a[1].id, a[2].id]
    assert jm.claim("w1") is None


def test_positions_follow_the_claims_and_the_events_record_them(jm):
    g = submit(jm, "globex")
    a1, a2 = submit(jm, "acme", "x"), submit(jm, "acme", "y")
    lines = [e.message for e in jm.events("acme", a2.id) if e.message.startswith("queued")]
    assert lines == ["queued: position 3, waiting behind another tenant's job and your job " + a1.id]
    assert [e.data for e in jm.events("acme", a2.id) if e.message.startswith("queued")] == [{"queue_position": 3}]
    assert jm.claim("w1").id == g.id
    # globex holds the worker now: acme's jobs move up; list() shows the same positions
    assert {j.id: j.queue_position for j in jm.list("acme")} == {a1.id: 1, a2.id: 2}
    assert jm.list("globex")[0].queue_position is None


def test_a_released_job_is_queued_again_and_the_waiting_tenant_goes_first(jm):
    a = submit(jm, "acme")
    job = jm.claim("w1")
    assert job.id == a.id and job.attempts == 1
    jm.set_running(a.id, "w1", {}, {})
    assert jm.contender(a.id) is None
    g = submit(jm, "globex")
    found = jm.contender(a.id)
    assert found is not None and found.tenant == "globex"
    assert jm.contender(a.id, grace_seconds=3600) is None  # globex has not waited that long
    assert jm.contender(g.id) is None  # acme holds a worker: globex is not owed one more
    assert jm.release(a.id, "w1", message="yielded the worker to another tenant's job") is True
    back = jm.get("acme", a.id)
    assert back.status == "queued" and back.worker_id is None and back.attempts == 0 and back.error is None
    assert back.queue_position == 2
    messages = [e.message for e in jm.events("acme", a.id)]
    assert messages[-2:] == ["yielded the worker to another tenant's job",
                             "queued: position 2, waiting behind another tenant's job"]
    with pytest.raises(LostJobError):  # the worker that let go cannot write to it any more
        jm.progress(a.id, "w1", {"step": 1})
    assert jm.claim("w1").id == g.id  # globex never had a worker; acme just had one
    again = jm.claim("w2")
    assert again.id == a.id and again.attempts == 1 and again.started_at == job.started_at


def test_a_release_after_a_cancel_request_changes_nothing(jm):
    a = submit(jm, "acme")
    jm.claim("w1")
    jm.cancel("acme", a.id)
    assert jm.release(a.id, "w1", message="yield") is False
    job = jm.get("acme", a.id)
    assert job.status == "validating" and job.worker_id == "w1" and job.cancel_requested


def test_concurrent_claims_stay_exclusive_and_fair(jm):
    """Six threads claim at once from three tenants' queues: each job once, and the first three
    claims went one to each tenant (nobody took a second turn while another tenant waited)."""
    jobs = {t: [submit(jm, t, f"j{i}") for i in range(3)] for t in ("acme", "globex", "initech")}
    jm.db.dispose()
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    go = threading.Barrier(6)

    def grab(w: int) -> None:
        go.wait()
        while (job := jm.claim(f"w{w}")) is not None:
            with lock:
                claimed.append((job.tenant, job.id))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # max_concurrent_jobs 1 and nobody finished: exactly one job per tenant, its oldest
    assert sorted(claimed) == sorted((t, js[0].id) for t, js in jobs.items())


# -- the trainer's yield hook -----------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    return tiny_base(seed=1, initializer_range=0.3)


def run(base, **kw):
    tr, va = sentiment(80, seed=0), sentiment(30, seed=1)
    ids = {name: i for i, name in enumerate(LABELS)}
    hp = Hyperparameters.from_dict({**FAST_HP, "epochs": 4, "batch_size": 8, "lora_dropout": 0.1})
    return train(base, [r["text"] for r in tr], [ids[r["label"]] for r in tr], LABELS,
                 [r["text"] for r in va], [ids[r["label"]] for r in va], hp=hp, threads=1, **kw)


def test_yielding_mid_epoch_and_at_epoch_ends_resumes_to_the_same_weights(base, tmp_path):
    """Yield at step 3 (mid-epoch 1), after epoch 2, and at step 35 (mid-epoch 4): each run
    resumes exactly where the last stopped -- dropout included -- and ends with the weights of a
    run that never stopped."""
    straight = run(base)
    ckpt = tmp_path / "ckpt"
    plan = {(False, 3), (True, 20), (False, 35)}  # (at an epoch end, steps done); 10 steps an epoch
    # A run asks before every step but its first, and after every epoch but the last: the hook
    # knows how many steps are done from where the run started and how often it was asked.
    count = {"start": 0, "asked": 0}
    yields: list[TrainingYielded] = []
    events: list[str] = []

    def should_yield(at_epoch_end: bool) -> bool:
        if not at_epoch_end:
            count["asked"] += 1
        done = count["start"] + count["asked"] + (1 if at_epoch_end else 0)
        return (at_epoch_end, done) in plan

    callbacks = TrainCallbacks(should_yield=should_yield, on_event=lambda lv, m: events.append(m))
    for _ in range(10):
        try:
            result = run(base, checkpoint_dir=ckpt, callbacks=callbacks)
            break
        except TrainingYielded as y:
            yields.append(y)
            count.update(start=y.step, asked=0)
    else:
        raise AssertionError("training never finished")
    assert [(y.epoch, y.step, y.mid_epoch) for y in yields] == [(1, 3, True), (3, 20, False), (4, 35, True)]
    assert [m for m in events if m.startswith("resumed")] == [
        "resumed from the checkpoint after epoch 0 and 3 steps of epoch 1",
        "resumed from the checkpoint after epoch 2",
        "resumed from the checkpoint after epoch 3 and 5 steps of epoch 4",
    ]
    ws, wr = straight.artifact.weights, result.artifact.weights
    for p in ws.lora:
        assert torch.equal(ws.lora[p][0], wr.lora[p][0]) and torch.equal(ws.lora[p][1], wr.lora[p][1])
    assert torch.equal(ws.head_weight, wr.head_weight)
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in straight.history]
    assert result.metrics["epochs_run"] == 4


def test_a_run_trains_a_step_before_it_yields_and_never_yields_after_its_last_epoch(base, tmp_path):
    asked: list[bool] = []

    def always(at_epoch_end: bool) -> bool:
        asked.append(at_epoch_end)
        return True

    ckpt = tmp_path / "ckpt"
    runs = 0
    while True:
        runs += 1
        try:
            result = run(base, checkpoint_dir=ckpt, callbacks=TrainCallbacks(should_yield=always))
            break
        except TrainingYielded:
            assert runs < 100, "no progress between yields"
    assert runs == 40 and result.metrics["epochs_run"] == 4  # 40 steps: one per run
    assert asked.count(True) == 3  # after epochs 1-3; never after the last
    assert run(base, callbacks=TrainCallbacks(should_yield=always)).metrics["epochs_run"] == 4  # no checkpoints


# -- end to end: a real worker process ----------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    b = tiny_base(seed=1, initializer_range=0.3)
    b.model.save_pretrained(model)
    b.tokenizer.save_pretrained(model)
    reg = Registry(f"sqlite:///{tmp_path / 'tailor.db'}")
    reg.create_tenant("acme")
    reg.create_tenant("globex")
    return tmp_path


@pytest.fixture()
def worker(home: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(home / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters.jobs.worker", "--database-url", f"sqlite:///{home / 'tailor.db'}",
         "--store-url", str(home / "store"), "--checkpoints", str(home / "checkpoints"),
         "--base-model", str(home / "model"), "--threads", "1", "--poll-seconds", "0.1", "--nice", "0",
         "--yield-min-turn-seconds", "0.5", "--yield-grace-seconds", "0.5"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_a_small_job_runs_before_another_tenants_long_job_ends(home, worker):
    jm = JobManager(Registry(f"sqlite:///{home / 'tailor.db'}").engine, LocalStore(home / "store"))
    log = home / "worker.log"
    # 40 steps an epoch, 30 epochs: the small job's wait (grace, minimum turn, one epoch, a poll)
    # is a small part of what is left of the long job when it is submitted, on a fast machine or
    # a slow one alike
    # at a learning rate the tiny base trains steadily at: FAST_HP's 0.01 collapsed to one label
    # at epoch 5 on one CPU (AVX-512) and not on another, and the collapse rule then ends the run
    # early (measured on the AVX-512 one: 0.005, 0.003, 0.002 and 0.001 all ran 30 epochs to 1.0)
    long_hp = {**FAST_HP, "epochs": 30, "patience": 30, "batch_size": 4, "learning_rate": 0.003}
    long = jm.submit("acme", "big", training=from_records(sentiment(200)), hyperparameters=long_hp)
    wait_until(lambda: jm.get("acme", long.id).progress.get("epoch", 0) >= 2, 300)
    small = jm.submit("globex", "small", training=from_records(sentiment(36)), hyperparameters=FAST_HP)
    seen = {"small_ran": False}

    def small_running() -> bool:
        assert worker.poll() is None, log.read_text()[-3000:]
        seen["small_ran"] |= jm.get("globex", small.id).status in ("running", "succeeded")
        return seen["small_ran"]

    wait_until(small_running, 120)
    assert jm.get("acme", long.id).status in ("queued", "validating")  # gave its worker away, unfinished
    wait_until(lambda: jm.get("acme", long.id).status not in ("queued", "validating", "running"), 600)
    done_small, done_long = jm.get("globex", small.id), jm.get("acme", long.id)
    assert done_small.status == "succeeded", done_small.error
    assert done_long.status == "succeeded", (done_long.error, log.read_text()[-3000:])
    assert done_long.attempts == 1  # the yield was not counted as a failed attempt
    assert done_long.metrics["epochs_run"] == 30 and done_long.metrics["val_accuracy"] >= 0.9
    messages = [e.message for e in jm.events("acme", long.id)]
    yielded = [m for m in messages if m.startswith("yielded the worker")]
    assert yielded and "globex" not in " ".join(messages)
    assert any(m.startswith("queued: position") for m in messages)
    resumed = [m for m in messages if m.startswith("resumed from the checkpoint after epoch")]
    assert resumed and not any(m.endswith("after epoch 0") for m in resumed)
    # the worker dropped its local copy when it yielded: the newest one came through the store
    assert any("resuming from its checkpoint in the store" in m for m in messages)
    assert jm.store.list(shared_checkpoints.prefix("acme", long.id)) == []  # removed once the job ended
    assert not (home / "checkpoints" / long.id).exists()
    # every epoch trained exactly once: the resumed run continued where the yield left it
    epochs = [e.data["epoch"] for e in jm.events("acme", long.id) if e.type == "metrics" and e.data
              and "val_accuracy" in e.data]
    assert epochs == list(range(1, 31))
    assert "yields the worker to tenant globex" in log.read_text()


# -- over HTTP: the position on GET /v1/jobs/{id} and in the events ------------------------------


def test_queue_position_over_http(served_text_only):
    """A real ``bentoml serve`` without training workers, so jobs stay queued: each job shows
    where it stands, other tenants' jobs ahead are counted but never named, and the positions
    move up when a job ahead leaves the queue. (The session's text-only server: no other test
    queues jobs there.)"""
    s = served_text_only
    with s.client(s.admin_key) as admin:
        keys = {t: admin.post("/v1/tenants", json={"name": t}).json()["api_key"] for t in ("acme", "globex")}
    body = {"adapter": "mood", "training_data": sentiment(20), "hyperparameters": FAST_HP}
    with s.client(keys["acme"]) as acme, s.client(keys["globex"]) as globex:
        a1, a2 = (acme.post("/v1/jobs", json=body).json() for _ in range(2))
        g1 = globex.post("/v1/jobs", json=body).json()
        assert (a1["status"], a1["queue_position"], a2["queue_position"]) == ("queued", 1, 2)
        assert g1["queue_position"] == 2  # tenants take turns: globex's first job before acme's second
        assert acme.get(f"/v1/jobs/{a2['id']}").json()["queue_position"] == 3
        assert {j["id"]: j["queue_position"] for j in acme.get("/v1/jobs").json()} == {a1["id"]: 1, a2["id"]: 3}
        lines = [e["message"] for e in globex.get(f"/v1/jobs/{g1['id']}/events").json()]
        assert "queued: position 2, waiting behind another tenant's job" in lines
        assert not any("acme" in line or a1["id"] in line for line in lines)
        cancelled = acme.post(f"/v1/jobs/{a1['id']}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
        # neither tenant had a worker yet: the one whose oldest queued job came first goes first
        assert acme.get(f"/v1/jobs/{a2['id']}").json()["queue_position"] == 1
        assert globex.get(f"/v1/jobs/{g1['id']}").json()["queue_position"] == 2
