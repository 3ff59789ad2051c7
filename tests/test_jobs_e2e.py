"""Jobs end to end: real worker processes, a real SQLite file and store, a tiny real model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapters.base import load_base, tiny_base
from adapters.catalog import Catalog
from adapters.datasets import from_records
from adapters.errors import AdapterNotFoundError
from adapters.jobs import gate
from adapters.jobs.manager import JobManager
from adapters.jobs.supervisor import local_worker_dead
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from tests.training_data import FAST_HP, SLOW_HP, sentiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-model")
    b = tiny_base(seed=1, initializer_range=0.3)
    b.model.save_pretrained(d)
    b.tokenizer.save_pretrained(d)
    return d


class World:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp, self.model_dir = tmp, model_dir
        self.db_url = f"sqlite:///{tmp}/tailor.db"
        self.registry = Registry(self.db_url)
        self.store = LocalStore(tmp / "store")
        self.jobs = JobManager(self.registry.engine, self.store)
        self.catalog = Catalog(self.registry, self.store)
        for tenant in ("acme", "globex"):
            self.registry.create_tenant(tenant)
        self.procs: list[subprocess.Popen[bytes]] = []

    def worker(self, *extra: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "adapters.jobs.worker", "--database-url", self.db_url,
               "--store-url", str(self.tmp / "store"), "--checkpoints", str(self.tmp / "ckpt"),
               "--base-model", str(self.model_dir), "--poll-seconds", "0.2", "--heartbeat-seconds", "0.2",
               "--threads", "1", *extra]
        p = subprocess.Popen(cmd, cwd=REPO, stdout=open(self.tmp / "worker.log", "ab"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def wait(self, tenant: str, job_id: str, statuses: tuple[str, ...], timeout: float = 300.0):
        deadline = time.monotonic() + timeout
        while True:
            job = self.jobs.get(tenant, job_id)
            if job.status in statuses:
                return job
            if time.monotonic() > deadline:
                log = (self.tmp / "worker.log").read_text()[-3000:]
                raise AssertionError(f"job {job_id} still {job.status} after {timeout}s\n{log}")
            time.sleep(0.1)

    def engine(self) -> Engine:
        return Engine(load_base(str(self.model_dir)), self.catalog)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


@pytest.fixture()
def world(tmp_path, model_dir):
    w = World(tmp_path, model_dir)
    yield w
    w.close()


def accuracy(engine: Engine, tenant: str, ref: str, rows: list[dict[str, str]]) -> float:
    adapter = engine.acquire(engine.resolve(tenant, ref))
    preds = engine.classify([r["text"] for r in rows], [adapter] * len(rows))
    return sum(p.label == r["label"] for p, r in zip(preds, rows)) / len(rows)


def test_two_tenants_train_and_are_served_in_isolation(world):
    # long enough (a few seconds each) that both run at once, whichever worker process starts first
    # and however late the other does on a loaded box: with FAST_HP's 12 epochs a job takes ~1 s
    long_hp = {**FAST_HP, "epochs": 50, "patience": 50}
    good = world.jobs.submit("acme", "sentiment", training=from_records(sentiment(160)), hyperparameters=long_hp)
    topics = [{"text": f"{w} {w} report {i}", "label": lab} for i in range(60)
              for lab, w in [(["sport", "money", "music"][i % 3], ["goal", "bank", "song"][i % 3])]]
    other = world.jobs.submit("globex", "topics", training=from_records(topics), hyperparameters=long_hp)
    bad = world.jobs.submit("globex", "broken", training=from_records(sentiment(40)),
                            hyperparameters={**FAST_HP, "target_modules": ["attention.nonexistent"]})
    world.worker()
    world.worker()  # two processes: the two tenants' jobs train at the same time
    overlapped, deadline = False, time.monotonic() + 300
    while not overlapped and time.monotonic() < deadline:
        states = {world.jobs.get("acme", good.id).status, world.jobs.get("globex", other.id).status}
        overlapped = states <= {"validating", "running"}
        if states & {"succeeded", "failed"}:
            break
        time.sleep(0.05)
    assert overlapped, "the two tenants' jobs never ran at the same time"
    job = world.wait("acme", good.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    assert job.version == 1 and job.result["promoted"] and job.metrics["val_accuracy"] >= 0.9
    assert job.progress["fraction"] == 1.0 and job.finished_at is not None
    events = world.jobs.events("acme", good.id)
    assert any(e.type == "metrics" and "train_loss" in (e.data or {}) for e in events)
    assert any(e.type == "metrics" and "val_accuracy" in (e.data or {}) for e in events)
    failed = world.wait("globex", bad.id, ("succeeded", "failed"))
    assert failed.status == "failed" and failed.error.code == "invalid_hyperparameters"
    assert "'attention.nonexistent' matches no linear layer" in failed.error.message
    with pytest.raises(AdapterNotFoundError):
        world.registry.resolve("globex", "broken", 1)  # a failed job registers nothing
    assert world.wait("globex", other.id, ("succeeded", "failed")).status == "succeeded"

    engine = world.engine()
    assert accuracy(engine, "acme", "sentiment", sentiment(40, seed=7)) >= 0.9
    assert engine.acquire(engine.resolve("globex", "topics")).labels == ("money", "music", "sport")
    for tenant, name in (("globex", "sentiment"), ("acme", "topics")):
        with pytest.raises(AdapterNotFoundError):
            engine.resolve(tenant, name)
    assert [j.id for j in world.jobs.list("acme")] == [good.id]


def test_cancel_mid_run_registers_nothing(world):
    job = world.jobs.submit("acme", "slow", training=from_records(sentiment(200)),
                            hyperparameters=SLOW_HP)
    world.worker()
    deadline = time.monotonic() + 300
    while world.jobs.get("acme", job.id).progress.get("step", 0) < 5:
        assert time.monotonic() < deadline, "the job never made progress"
        time.sleep(0.1)
    t0 = time.monotonic()
    world.jobs.cancel("acme", job.id)
    done = world.wait("acme", job.id, ("cancelled", "succeeded", "failed"), timeout=30)
    assert done.status == "cancelled" and time.monotonic() - t0 < 10
    with pytest.raises(AdapterNotFoundError):
        world.registry.resolve("acme", "slow", 1)
    assert not (world.tmp / "ckpt" / job.id).exists()


def test_sigkill_mid_job_is_recovered_from_its_checkpoint(world):
    job = world.jobs.submit("acme", "durable", training=from_records(sentiment(120)),
                            hyperparameters={**FAST_HP, "epochs": 6, "batch_size": 4})
    first = world.worker()
    deadline = time.monotonic() + 300
    while not (world.tmp / "ckpt" / job.id / "state.json").exists():
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert world.jobs.get("acme", job.id).status == "running"
    assert world.jobs.recover(is_dead=local_worker_dead) == [job.id]  # what the supervisor does on start
    assert world.jobs.get("acme", job.id).status == "queued"
    world.worker()
    done = world.wait("acme", job.id, ("succeeded", "failed"))
    assert done.status == "succeeded" and done.attempts == 2
    messages = [e.message for e in world.jobs.events("acme", job.id)]
    assert any("requeued" in m for m in messages)
    assert any("resumed from the checkpoint after epoch" in m for m in messages)
    assert [v.version for v in world.registry.list_versions("acme", "durable")] == [1]


def test_gate_keeps_a_worse_candidate_out_and_rollback_restores_exactly(world):
    val = from_records(sentiment(30, seed=3))
    v1 = world.jobs.submit("acme", "s", training=from_records(sentiment(80)), validation=val, hyperparameters=FAST_HP)
    flipped = [{"text": r["text"], "label": "neg" if r["label"] == "pos" else "pos"} for r in sentiment(80, seed=5)]
    v2 = world.jobs.submit("acme", "s", training=from_records(flipped), validation=val, hyperparameters=FAST_HP)
    world.worker()
    assert world.wait("acme", v1.id, ("succeeded", "failed")).status == "succeeded"
    second = world.wait("acme", v2.id, ("succeeded", "failed"))
    assert second.status == "succeeded" and second.version == 2
    assert not second.result["promoted"] and "candidate" not in second.result["gate"]["reason"]
    final = [e.message for e in world.jobs.events("acme", v2.id)][-1]
    made = world.registry.get_version("acme", "s", 2).manifest  # trained here: says so, and by which job
    assert (made["source"], made["job_id"]) == ("tailor", v2.id)
    assert final.count("kept as a candidate") == 1 and second.result["gate"]["reason"] in final, final
    assert world.registry.get_aliases("acme", "s")["prod"] == 1

    engine = world.engine()
    texts = [r["text"] for r in sentiment(20, seed=9)]
    def logits(ref: str) -> torch.Tensor:
        a = engine.acquire(engine.resolve("acme", ref))
        return torch.stack(engine.forward(engine.base.tokenize(texts), [a] * len(texts)).logits)
    before = logits("s")
    world.registry.set_alias("acme", "s", "prod", 2)
    engine.refresh("acme", "s")
    assert not torch.equal(logits("s"), before)
    assert world.registry.rollback("acme", "s") == 1
    engine.refresh("acme", "s")
    assert torch.equal(logits("s"), before)


def test_gate_decisions():
    labels = ["a"] * 6 + ["b"] * 4
    assert gate.decide("auto", {"accuracy": 0.9}, None, None, labels).promote
    refused = gate.decide("auto", {"accuracy": 0.6}, None, None, labels)
    assert not refused.promote and "most common label" in refused.reason
    worse = gate.decide("auto", {"accuracy": 0.8}, {"accuracy": 0.9}, 3, labels)
    assert not worse.promote and "below prod v3" in worse.reason
    assert gate.decide("auto", {"accuracy": 0.9}, {"accuracy": 0.9}, 3, labels).promote
    assert gate.decide("always", {"accuracy": 0.1}, {"accuracy": 0.9}, 3, labels).promote
    assert not gate.decide("never", {"accuracy": 1.0}, None, None, labels).promote
