"""Several serving workers (``TAILOR_WORKERS=2``): each holds its own base model and adapter
cache, and an adapter promoted, rolled back or deleted through any of them is seen by every
worker within a second, from the registry.

Each response names its worker (``X-Tailor-Worker: <pid>``); every request here opens a new
connection, so requests spread over both workers. After each change the test polls from a few
threads until every worker has answered with the new state, and asserts that happened within
1.0 s of the change's response, and that no worker went back to the old state afterwards.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from adapters.base import load_base
from adapters.peft_format import export_peft, zip_files
from adapters.synthetic import random_artifact
from tests.service_fixture import save_tiny_base, serving

WORKERS = 2
DEADLINE_S = 1.0
POLL_THREADS = 3


@dataclass(frozen=True)
class Answer:
    sent: float  # monotonic, when the request was sent
    received: float
    worker: str
    status: int
    version: int | None


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    model_dir = save_tiny_base(root / "model")
    with serving(root / "home", model_dir, {"TAILOR_WORKERS": str(WORKERS)}) as s:
        yield s


def ask(url: str, key: str, adapter: str) -> Answer:
    """One predict on a new connection: which worker answered, and what. (http.client: a new
    httpx.Client per request costs tens of ms of client CPU, which a busy 2-core box feels.)"""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    body = json.dumps({"adapter": adapter, "inputs": ["hello there"]})
    sent = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", "/v1/predict", body=body, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Connection": "close"})
        r = conn.getresponse()
        data = json.loads(r.read())
    finally:
        conn.close()
    received = time.monotonic()
    version = data.get("version") if r.status == 200 else None
    return Answer(sent, received, r.getheader("x-tailor-worker", "?"), r.status, version)


def poll_workers(url: str, key: str, adapter: str, want: tuple[int, int | None], since: float,
                 deadline: float) -> tuple[dict[str, float], list[Answer]]:
    """Ask from several threads until every worker has answered ``want`` (status, version) or
    ``deadline`` seconds have passed since ``since``. Returns, per worker, how long after
    ``since`` its first ``want`` answer arrived (answers after the deadline do not count), and
    every answer."""
    answers: list[Answer] = []
    first: dict[str, float] = {}
    lock = threading.Lock()
    done = threading.Event()

    def loop() -> None:
        while not done.is_set() and time.monotonic() < since + deadline:
            a = ask(url, key, adapter)
            with lock:
                answers.append(a)
                if (a.status, a.version) == want and a.received <= since + deadline:
                    first.setdefault(a.worker, a.received - since)
                    if len(first) >= WORKERS:
                        done.set()

    with ThreadPoolExecutor(POLL_THREADS) as pool:
        for f in [pool.submit(loop) for _ in range(POLL_THREADS)]:
            f.result()
    return first, answers


def assert_every_worker_within_deadline(url: str, key: str, adapter: str, want: tuple[int, int | None],
                                        since: float, what: str) -> None:
    first, answers = poll_workers(url, key, adapter, want, since, DEADLINE_S)
    seen = {a.worker for a in answers}
    summary = [(a.worker, a.status, a.version, round(a.received - since, 3)) for a in answers]
    assert len(first) == WORKERS, (
        f"{what}: only workers {sorted(first)} of {sorted(seen)} answered {want} within {DEADLINE_S}s: {summary}")
    assert max(first.values()) <= DEADLINE_S
    print(f"{what}: every worker within {max(first.values()):.3f}s of the change ({len(answers)} answers)")
    # once a worker has shown the new state, it never shows the old one again
    for a in answers:
        if a.worker in first and a.sent - since > first[a.worker]:
            assert (a.status, a.version) == want, f"{what}: worker {a.worker} went back: {summary}"


def every_worker_answers(url: str, key: str, adapter: str, want: tuple[int, int | None],
                         timeout: float) -> set[str]:
    """Wait (up to ``timeout``, e.g. while workers load the model) until every worker answers ``want``."""
    first, answers = poll_workers(url, key, adapter, want, time.monotonic(), timeout)
    assert len(first) == WORKERS, f"not every worker answered {want}: {[(a.worker, a.status) for a in answers][-20:]}"
    return set(first)


def adapter_zip(spec, seed: int) -> bytes:
    return zip_files(export_peft(random_artifact(spec, seed=seed, n_labels=2), spec))


def test_changes_reach_every_worker_within_a_second(multi):
    spec = load_base(str(multi.model_dir)).spec
    with multi.client(multi.admin_key) as admin:
        # it polls every worker as fast as it can: far above the default rate limit
        r = admin.post("/v1/tenants", json={"name": "spread", "quotas": {"requests_per_second": 100_000}})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    url = multi.url
    # /readyz answered for one worker; wait until both have loaded the base (503 until then)
    workers = every_worker_answers(url, key, "clf", (404, None), timeout=60)
    assert len(workers) == WORKERS

    def call(method: str, path: str, **kw) -> float:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            r = c.request(method, path, **kw)
        assert r.status_code in (200, 201), (method, path, r.status_code, r.text)
        return time.monotonic()

    for seed in (1, 2):  # two versions, neither prod yet
        call("POST", "/v1/adapters/clf/import", files={"file": ("a.zip", adapter_zip(spec, seed), "application/zip")},
             data={"promote": "false"})
    for version in (1, 2):  # both versions resident in every worker: what follows measures only the change
        assert every_worker_answers(url, key, f"clf@{version}", (200, version), timeout=10) == workers
    assert every_worker_answers(url, key, "clf", (404, None), timeout=10) == workers  # no prod: no fallback

    t = call("POST", "/v1/adapters/clf/promote", json={"version": 1})
    assert_every_worker_within_deadline(url, key, "clf", (200, 1), t, "promote v1")

    t = call("POST", "/v1/adapters/clf/promote", json={"version": 2})
    assert_every_worker_within_deadline(url, key, "clf", (200, 2), t, "promote v2")

    t = call("POST", "/v1/adapters/clf/rollback")
    assert_every_worker_within_deadline(url, key, "clf", (200, 1), t, "rollback to v1")

    t = call("DELETE", "/v1/adapters/clf")
    assert_every_worker_within_deadline(url, key, "clf", (404, None), t, "delete")
    assert every_worker_answers(url, key, "clf@1", (404, None), timeout=DEADLINE_S) == workers
    # each worker's one change feed polled the log, and /metrics counts it (summed over workers)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    polls = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("tailor_change_log_polls_total")]
    assert polls and sum(polls) >= WORKERS, polls
