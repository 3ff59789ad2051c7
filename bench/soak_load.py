"""The soak's traffic, all in one asyncio loop: tenants' predictions, the hostile tenant,
promotions and rollbacks (each followed by probes until every worker serves the change),
training jobs, RSS sampling and the SIGKILL of one serving worker.

Every loop is bounded by the run's end time and a request budget; waits between actions are
pacing (the churn and job intervals), never a stand-in for a condition.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bench.soak_checks import ADAPTER, JOB_ADAPTER, Answer, Change, Timeline, job_labels
from bench.soak_client import Connection, Reply, TransportError
from bench.soak_server import RssSample, SoakServer
from bench.soak_tenants import Tenant

TERMINAL = ("succeeded", "failed", "cancelled")
PROBE_CLIENTS = 3
PROBE_DEADLINE_S = 3.0  # probes stop this long after a change's response (the target is 1 s)
JOB_POLL_S = 0.5
BAD_KEY = "tk-forged-0000000000000000000000000000"


@dataclass(frozen=True)
class Plan:
    seconds: float  # the whole run, warm-up included
    warmup: float  # latency and RSS baselines start after this
    clients: int  # predict clients of the well-behaved tenants, one request in flight each
    rate: float  # their offered requests/s in all (think times between requests); 0: none, as fast as answered
    hostile_clients: int
    churn_every: float  # a promote or rollback this often
    job_every: float  # a training job submitted this often
    kill_at: float | None  # seconds into the run; None: no kill
    kill_pool_holder: bool  # kill the serving worker that runs the training pool
    max_requests: int  # a bound on each client's requests
    job_rows: int
    job_hyperparameters: dict[str, Any]
    workers: int
    job_grace: float  # after the run, how long jobs may take to finish before they count as stuck
    respawn_timeout: float  # the run is extended until the killed worker is back, at most this long
    seed: int = 0


@dataclass
class Call:
    """A well-formed non-predict call (promote, rollback, job API) and its outcome."""

    what: str
    sent: float
    received: float
    status: int  # 0: no response
    detail: str = ""


@dataclass
class JobRecord:
    tenant: str
    submitted: float
    id: str | None = None
    status: str = "submitting"
    running_at: float | None = None
    finished_at: float | None = None
    version: int | None = None
    error: str | None = None
    server_wait_s: float | None = None  # the service's started_at - created_at (queued, validating)
    server_run_s: float | None = None  # finished_at - started_at


@dataclass
class Probe:
    change: Change
    answers: list[Answer] = field(default_factory=list)


@dataclass
class Recorder:
    start: float
    end: float = 0.0  # when the load stopped (the planned end, or later while a worker respawned)
    answers: list[Answer] = field(default_factory=list)
    hostile: list[tuple[str, float, float, int]] = field(default_factory=list)  # kind, sent, received, status
    calls: list[Call] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    jobs: list[JobRecord] = field(default_factory=list)
    rss: list[RssSample] = field(default_factory=list)
    roles: dict[int, str] = field(default_factory=dict)  # pid -> its role in the server's tree
    kill: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _when(value: str | None) -> float | None:
    """A timestamp of the API (ISO 8601) as seconds since the epoch."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Soak:
    def __init__(self, server: SoakServer, tenants: list[Tenant], hostile: Tenant, corpus: list[str],
                 plan: Plan, timeline: Timeline) -> None:
        self.server, self.tenants, self.hostile, self.corpus, self.plan = server, tenants, hostile, corpus, plan
        self.timeline = timeline
        self.prod = dict(timeline.initial)
        self.rec = Recorder(start=time.monotonic(), roles=server.roles)
        self.end = self.rec.start + plan.seconds
        self._workers_seen: set[str] = set()

    def conn(self) -> Connection:
        return Connection(self.server.host, self.server.port)

    def running(self) -> bool:
        return time.monotonic() < self.end

    async def run(self) -> Recorder:
        tasks = [self.client(i) for i in range(self.plan.clients)]
        tasks += [self.hostile_client(i) for i in range(self.plan.hostile_clients)]
        tasks += [self.churn(), self.jobs(), self.sample_rss()]
        if self.plan.kill_at is not None:
            tasks.append(self.killer())
        await asyncio.gather(*tasks)
        self.rec.end = self.end
        return self.rec

    # -- predictions ---------------------------------------------------------------------------

    async def predict(self, conn: Connection, source: str, tenant: Tenant, ref: str, inputs: list[str],
                      close: bool = False) -> Answer:
        body = json.dumps({"adapter": ref, "inputs": inputs}).encode()
        sent = time.monotonic()
        try:
            reply = await conn.request("POST", "/v1/predict", body, key=tenant.key, close=close)
        except TransportError as e:
            reply = Reply(0, str(e).encode(), "")
        answer = Answer(source, tenant.name, ref, sent, time.monotonic(), reply.status, reply.worker, reply.body)
        self.rec.answers.append(answer)
        if reply.status == 200:
            self._workers_seen.add(reply.worker)
        elif reply.status:
            await conn.close()  # a 503 or a refusal: the next request may land on another worker
        return answer

    async def client(self, i: int) -> None:
        """A client with one request in flight: a random tenant's prod (80%) or a pinned version,
        1-3 texts; a new connection every 25 requests so load spreads over workers, respawned
        ones too. Between requests it thinks (exponential, mean clients / rate), so the offered
        load stays near ``rate`` while the server keeps up and falls when it does not."""
        rng = random.Random(self.plan.seed * 1000 + i)
        think = self.plan.clients / self.plan.rate if self.plan.rate > 0 else 0.0
        conn = self.conn()
        try:
            for n in range(self.plan.max_requests):
                if think:
                    await asyncio.sleep(min(rng.expovariate(1 / think), max(0.0, self.end - time.monotonic())))
                if not self.running():
                    break
                t = rng.choice(self.tenants)
                ref = ADAPTER if rng.random() < 0.8 else f"{ADAPTER}@{rng.choice(t.versions)}"
                await self.predict(conn, "load", t, ref, rng.sample(self.corpus, rng.randint(1, 3)),
                                   close=n % 25 == 24)
        finally:
            await conn.close()

    # -- the hostile tenant --------------------------------------------------------------------

    def hostile_requests(self) -> list[tuple[str, bytes, str | None]]:
        """(kind, raw body, key) of each hostile request; every one deserves a 4xx, never a 5xx."""
        k = self.hostile.key

        def j(obj: Any) -> bytes:
            return json.dumps(obj).encode()  # ensure_ascii: a lone surrogate goes out as \ud800

        return [
            ("lone_surrogate", j({"adapter": ADAPTER, "inputs": ["\ud800"]}), k),
            ("surrogate_among_valid", j({"adapter": ADAPTER, "inputs": ["a fine sentence", "bad \udfff tail"]}), k),
            ("surrogate_pair_halves", b'{"adapter": "clf", "inputs": ["\\udc00\\ud800"]}', k),
            ("huge_input", j({"adapter": ADAPTER, "inputs": ["word " * 40_000]}), k),
            ("too_many_inputs", j({"adapter": ADAPTER, "inputs": ["x"] * 5000}), k),
            ("unknown_adapter", j({"adapter": "nope", "inputs": ["x"]}), k),
            ("unknown_version", j({"adapter": f"{ADAPTER}@999", "inputs": ["x"]}), k),
            ("other_tenants_adapter", j({"adapter": f"{self.tenants[0].name}/{ADAPTER}", "inputs": ["x"]}), k),
            ("bad_key", j({"adapter": ADAPTER, "inputs": ["x"]}), BAD_KEY),
            ("no_key", j({"adapter": ADAPTER, "inputs": ["x"]}), None),
            ("malformed_json", b'{"adapter": "clf", "inputs": ["x"', k),
            ("not_utf8", b'{"adapter": "clf", "inputs": ["\xff\xfe"]}', k),
            ("wrong_types", j({"adapter": ADAPTER, "inputs": [1, None, {"a": 2}]}), k),
            ("empty_inputs", j({"adapter": ADAPTER, "inputs": []}), k),
            ("deep_nesting", b'{"adapter": "clf", "inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", k),
        ]

    async def hostile_client(self, i: int) -> None:
        """As fast as the server answers: the requests above in turn, and every 40th one a body
        over the default 10 MiB limit (sent after ``100 Continue``, if the server asks for it)."""
        conn = self.conn()
        kinds = self.hostile_requests()
        oversize = ("oversize_body", json.dumps({"adapter": ADAPTER, "inputs": ["y" * (11 << 20)]}).encode(),
                    self.hostile.key)
        try:
            for n in range(self.plan.max_requests):
                if not self.running():
                    break
                kind, body, key = oversize if n % 40 == 39 else kinds[(n + i) % len(kinds)]
                sent = time.monotonic()
                try:
                    big = kind == "oversize_body"
                    reply = await conn.request("POST", "/v1/predict", body, key=key, close=big, expect_continue=big)
                    status = reply.status
                except TransportError:
                    status = 0
                self.rec.hostile.append((kind, sent, time.monotonic(), status))
        finally:
            await conn.close()

    # -- promotions and rollbacks --------------------------------------------------------------

    async def churn(self) -> None:
        """Every third change rolls back the tenant changed just before (an "oops" rollback);
        the others promote a random tenant to another of its versions."""
        rng = random.Random(self.plan.seed + 7)
        conn = self.conn()
        last: Tenant | None = None
        try:
            for n in itertools.count():
                if time.monotonic() + self.plan.churn_every >= self.end:
                    break
                await asyncio.sleep(self.plan.churn_every)  # pacing
                if n % 3 == 2 and last is not None:
                    t = last
                    change = await self.change(conn, t, "rollback", None)
                else:
                    t = rng.choice(self.tenants)
                    version = rng.choice([v for v in t.versions if v != self.prod[t.name]])
                    change = await self.change(conn, t, "promote", version)
                if change is not None:
                    last = t
                    await self.probe(t, change)
        finally:
            await conn.close()

    async def change(self, conn: Connection, t: Tenant, kind: str, version: int | None) -> Change | None:
        old = self.prod[t.name]
        path = f"/v1/adapters/{ADAPTER}/{kind}"
        body = json.dumps({"version": version}).encode() if version is not None else b""
        sent = time.monotonic()
        try:
            reply = await conn.request("POST", path, body, key=t.key)
        except TransportError as e:
            reply = Reply(0, str(e).encode(), "")
        received = time.monotonic()
        self.rec.calls.append(Call(kind, sent, received, reply.status, reply.body[:300].decode(errors="replace")))
        if reply.status == 200:
            answer = json.loads(reply.body)
            new = int(answer["version"])
            if answer.get("previous") != old:  # only this task changes prod: the model must agree
                self.rec.notes.append(f"{t.name}: {kind} says prod was {answer.get('previous')}, expected {old}")
        else:
            # it may or may not have happened (a worker killed mid-call): ask what prod is now
            new = await self.current_prod(conn, t)
            received = time.monotonic()
            if new is None or new == old:
                return None
        change = Change(t.name, kind, sent, received, old, new)
        self.timeline.add(change)
        self.prod[t.name] = new
        return change

    async def current_prod(self, conn: Connection, t: Tenant) -> int | None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                reply = await conn.request("GET", f"/v1/adapters/{ADAPTER}", key=t.key)
            except TransportError as e:
                reply = Reply(0, str(e).encode(), "")
            self.rec.calls.append(Call("get_adapter", sent, time.monotonic(), reply.status))
            if reply.status == 200:
                return json.loads(reply.body).get("prod")
            await conn.close()
            await asyncio.sleep(0.2)  # a retry's backoff
        self.rec.notes.append(f"{t.name}: prod unknown after a failed change")
        return None

    async def probe(self, t: Tenant, change: Change) -> None:
        """Predict for the tenant on new connections (spread over workers) until every worker
        answered the new version, or PROBE_DEADLINE_S after the change's response."""
        probe = Probe(change)
        self.rec.probes.append(probe)
        deadline = change.received + PROBE_DEADLINE_S
        served: set[str] = set()

        async def loop() -> None:
            conn = self.conn()
            try:
                while time.monotonic() < deadline and len(served) < self.plan.workers:
                    a = await self.predict(conn, "probe", t, ADAPTER, [self.corpus[0]], close=True)
                    probe.answers.append(a)
                    if a.status == 200 and json.loads(a.body).get("version") == change.new:
                        served.add(a.worker)
            finally:
                await conn.close()

        await asyncio.gather(*(loop() for _ in range(PROBE_CLIENTS)))

    # -- training jobs -------------------------------------------------------------------------

    def job_rows(self, t: Tenant, n: int) -> list[dict[str, str]]:
        neg, pos = job_labels(t.name)
        good, bad = ("good", "great", "lovely", "superb"), ("bad", "awful", "poor", "grim")
        return [{"text": f"{(good if i % 2 else bad)[i % 4]} day number {i}", "label": pos if i % 2 else neg}
                for i in range(n)]

    async def jobs(self) -> None:
        conn = self.conn()
        pollers = []
        i = 0
        try:
            while self.running():
                t = self.tenants[i % len(self.tenants)]
                i += 1
                pollers.append(asyncio.ensure_future(self.submit_job(conn, t)))
                if time.monotonic() + self.plan.job_every >= self.end:
                    break
                await asyncio.sleep(self.plan.job_every)  # pacing
            await asyncio.gather(*pollers)
        finally:
            await conn.close()

    async def submit_job(self, conn: Connection, t: Tenant) -> None:
        job = JobRecord(t.name, time.monotonic())
        self.rec.jobs.append(job)
        body = json.dumps({"adapter": JOB_ADAPTER, "training_data": self.job_rows(t, self.plan.job_rows),
                           "hyperparameters": self.plan.job_hyperparameters, "promote": "always"}).encode()
        for _ in range(5):  # a worker killed mid-call: submit again (a job is only made by a 201)
            sent = time.monotonic()
            try:
                reply = await conn.request("POST", "/v1/jobs", body, key=t.key)
            except TransportError as e:
                reply = Reply(0, str(e).encode(), "")
            self.rec.calls.append(Call("submit_job", sent, time.monotonic(), reply.status,
                                       reply.body[:300].decode(errors="replace")))
            if reply.status == 201:
                job.id, job.status = json.loads(reply.body)["id"], json.loads(reply.body)["status"]
                break
            await conn.close()
            if reply.status not in (0, 503):
                job.status, job.error = "refused", reply.body[:300].decode(errors="replace")
                return
        if job.id is None:
            job.status = "not_submitted"
            return
        await self.follow_job(job, t)

    async def follow_job(self, job: JobRecord, t: Tenant) -> None:
        conn = self.conn()
        deadline = self.end + self.plan.job_grace
        try:
            while job.status not in TERMINAL and time.monotonic() < deadline:
                await asyncio.sleep(JOB_POLL_S)  # polling a condition, with a deadline
                sent = time.monotonic()
                try:
                    reply = await conn.request("GET", f"/v1/jobs/{job.id}", key=t.key)
                except TransportError as e:
                    reply = Reply(0, str(e).encode(), "")
                self.rec.calls.append(Call("get_job", sent, time.monotonic(), reply.status))
                if reply.status != 200:
                    await conn.close()
                    continue
                body = json.loads(reply.body)
                job.status = body["status"]
                if job.status == "running" and job.running_at is None:
                    job.running_at = time.monotonic()
                if job.status in TERMINAL:
                    job.finished_at = time.monotonic()
                    job.version = body.get("version")
                    job.error = (body.get("error") or {}).get("message")
                    created, started, finished = (_when(body.get(k)) for k in ("created_at", "started_at",
                                                                                "finished_at"))
                    if created is not None and started is not None:
                        job.server_wait_s = started - created
                    if started is not None and finished is not None:
                        job.server_run_s = finished - started
            if job.status == "succeeded" and job.version is not None:
                await self.predict(conn, "job", t, f"{JOB_ADAPTER}@{job.version}", ["a good day"])
        finally:
            await conn.close()

    # -- the process: RSS and the kill ---------------------------------------------------------

    async def sample_rss(self) -> None:
        while self.running():
            self.rec.rss.append(await asyncio.to_thread(self.server.rss))
            await asyncio.sleep(1.0)  # the sampling period

    async def killer(self) -> None:
        assert self.plan.kill_at is not None
        await asyncio.sleep(max(0.0, self.rec.start + self.plan.kill_at - time.monotonic()))  # scheduled
        if not self.running():
            return
        seen = sorted(int(w) for w in self._workers_seen if w.isdigit())
        alive = [pid for pid in seen if await asyncio.to_thread(self.server.is_worker, pid)]
        if not alive:
            self.rec.notes.append("kill: no serving worker seen alive")
            return
        holders = [pid for pid in alive if await asyncio.to_thread(self.server.runs_training_pool, pid)]
        wanted = holders if self.plan.kill_pool_holder else [p for p in alive if p not in holders]
        pid = (wanted or alive)[0]
        t = time.monotonic()
        await asyncio.to_thread(self.server.kill, pid)
        before = {str(p) for p in seen}
        self.rec.kill = {"t": t, "pid": str(pid), "workers_before": sorted(before),
                         "ran_training_pool": pid in holders}
        # The run goes on until the respawned worker has answered (checked by the report),
        # past its planned end if need be, up to respawn_timeout after the kill.
        while not self._workers_seen - before and time.monotonic() < t + self.plan.respawn_timeout:
            if time.monotonic() > self.end - 1.0:
                self.end = time.monotonic() + 1.0
            await asyncio.sleep(0.1)  # polling a condition, with a deadline
        if self._workers_seen - before:
            self.rec.kill["respawned_pid"] = sorted(self._workers_seen - before)[0]
        else:
            self.rec.notes.append(f"kill: no new worker answered within {self.plan.respawn_timeout:.0f}s")
