"""The local multi-replica run end to end: PostgreSQL, moto (S3), two serving replicas, one
training worker and NGINX with tenant affinity, all real processes on 127.0.0.1.

Train through the router, predict through the router, SIGKILL the replica that serves the
tenant: requests keep being answered by the other, no job or adapter is lost; restart it and
it serves an adapter trained while it was down, with no manual step.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

# Our own modules are imported plainly: an import error in them fails the run, never skips.
from deploy.local.cluster import Cluster
from deploy.local.nginx import find_nginx
from deploy.local.postgres import PostgresUnavailable, find_bin_dir
from tests.service_fixture import free_port, save_tiny_base
from tests.training_data import FAST_HP, sentiment

pytest.importorskip("moto", reason="moto (a PyPI test tool) stands in for S3")
try:  # the system programs the cluster runs: without one, skip and say which
    find_nginx()
    find_bin_dir()
except (FileNotFoundError, PostgresUnavailable) as e:
    pytest.skip(str(e), allow_module_level=True)


def trainable_model(directory: Path) -> Path:
    from adapters.base import tiny_base

    b = tiny_base(seed=1, initializer_range=0.3)
    b.model.save_pretrained(directory)
    b.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    model = trainable_model(root / "model")
    c = Cluster(root / "run", replicas=2, workers=1, port=free_port(), base_model=str(model),
                extra_env={"TAILOR_TRAIN_THREADS": "1", "TAILOR_MAX_WAIT_MS": "5"})
    with c:
        yield c


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def train(c: httpx.Client, adapter: str, seed: int) -> dict:
    r = c.post("/v1/jobs", json={"adapter": adapter, "training_data": sentiment(60, seed=seed),
                                 "hyperparameters": FAST_HP})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 300
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", job
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.3)


def test_train_predict_survive_a_replica_kill_and_restart(cluster):
    with client(cluster.url, cluster.admin_key) as admin:
        keys = {name: admin.post("/v1/tenants", json={"name": name}).json()["api_key"] for name in ("acme", "globex")}
    acme, globex = client(cluster.url, keys["acme"]), client(cluster.url, keys["globex"])

    job1 = train(acme, "mood", seed=1)
    assert job1["version"] == 1
    r = acme.post("/v1/predict", json={"adapter": "mood", "inputs": ["good good the day", "awful awful"]})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    home = r.headers["x-tailor-upstream"]  # the replica acme's key hashes to
    assert all(acme.post("/v1/predict", json={"adapter": "mood", "inputs": ["nice"]}).headers["x-tailor-upstream"]
               == home for _ in range(5)), "tenant affinity: one key, one replica"

    victim = [i for i in range(2) if home.endswith(f":{cluster.replica_ports[i]}")][0]
    cluster.kill_replica(victim)
    for _ in range(20):  # every request answered, now by the other replica
        r = acme.post("/v1/predict", json={"adapter": "mood", "inputs": ["lovely day"]})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1 and r.headers["x-tailor-upstream"] != home

    job2 = train(globex, "topics", seed=2)  # trained and registered while a replica is down
    assert acme.get(f"/v1/jobs/{job1['id']}").json()["status"] == "succeeded"
    assert [a["name"] for a in acme.get("/v1/adapters").json()] == ["mood"]
    assert [a["name"] for a in globex.get("/v1/adapters").json()] == ["topics"]

    cluster.start_replica(victim)  # no manual step: it reads everything from PostgreSQL and S3
    direct = {name: client(cluster.replica_url(victim), key) for name, key in keys.items()}
    r = direct["globex"].post("/v1/predict", json={"adapter": "topics", "inputs": ["grim grim day"]})
    assert r.status_code == 200 and r.json()["version"] == job2["version"] == 1, r.text
    r = direct["acme"].post("/v1/predict", json={"adapter": "mood", "inputs": ["grim"]})
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    # the router sends acme home again once the replica is back (after nginx's fail_timeout)
    deadline = time.monotonic() + 30
    while acme.post("/v1/predict", json={"adapter": "mood", "inputs": ["ok"]}).headers["x-tailor-upstream"] != home:
        assert time.monotonic() < deadline, "the restarted replica never got its tenants back"
        time.sleep(0.5)
