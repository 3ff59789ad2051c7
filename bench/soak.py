"""Soak under churn: many tenants' predictions while adapters are promoted and rolled back,
jobs train, one tenant attacks and one serving worker is SIGKILLed.

    python -m bench.soak [--quick] --out bench/results/soak-cpu.json

Starts ``bentoml serve .`` on 127.0.0.1 (``--workers`` serving workers, default 2, and one
training worker; the bundled MiniLM unless ``--base-model``), creates ``--tenants`` tenants
and imports ``--versions`` versions of adapter ``clf`` for each, whose label names say tenant
and version (``t007-v2-a``), so every prediction shows which adapter answered. Then, for
``--seconds`` (warm-up included):

* ``--clients`` clients predict for random tenants, ``clf`` (prod) or a pinned ``clf@N``, one
  request in flight each, thinking between requests so that together they offer about
  ``--rate`` requests/s (0: no thinking, as fast as answered: the server saturated, where
  latency is mostly queueing);
* every ``churn_every`` seconds a random tenant's prod is promoted to another version or
  rolled back, then probed on new connections until every worker serves the change;
* every ``job_every`` seconds a tenant submits a small training job (adapter ``job``);
* one tenant floods hostile requests: lone surrogates, huge inputs and bodies, unknown
  adapters, bad keys, malformed JSON;
* a quarter into the measured part, one serving worker (found by ``X-Tailor-Worker``; not the
  one running the training pool unless ``--kill-pool-holder``) is SIGKILLed; BentoML respawns
  it, and the run goes on until the new worker has answered;
* the RSS of the server's process tree is sampled every second.

The checks and the fault window are described in ``bench.soak_report``. Exit status 1 when a
check fails. Quick mode: 12 tenants, 60 s; the full run: 100 tenants, 10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapters.base import load_base
from bench.common import machine, parser, write
from bench.http import texts
from bench.soak_checks import ADAPTER, Timeline
from bench.soak_client import Connection, TransportError
from bench.soak_load import Plan, Soak
from bench.soak_report import plot, summarise
from bench.soak_server import ADMIN_KEY, SoakServer, free_port
from bench.soak_tenants import HOSTILE, Tenant, create_tenants, import_versions, new_tenant

# small and quick, yet enough steps to learn the job's two-word-list set (no divergence stop)
JOB_HYPERPARAMETERS = {"epochs": 6, "batch_size": 8, "learning_rate": 0.005, "max_length": 32, "lora_r": 4,
                       "target_modules": ["query", "value"]}
QUICK = {"tenants": 12, "versions": 3, "seconds": 60.0, "warmup": 15.0, "clients": 6, "rate": 15.0,
         "hostile_clients": 2, "churn_every": 2.0, "job_every": 12.0}
FULL = {"tenants": 100, "versions": 3, "seconds": 600.0, "warmup": 60.0, "clients": 16, "rate": 10.0,
        "hostile_clients": 3, "churn_every": 3.0, "job_every": 20.0}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__.splitlines()[0])
    for name, kind in (("tenants", int), ("versions", int), ("seconds", float), ("warmup", float),
                       ("clients", int), ("rate", float), ("hostile-clients", int), ("churn-every", float),
                       ("job-every", float)):
        p.add_argument(f"--{name}", type=kind, default=None, help="overrides the mode's value")
    p.add_argument("--workers", type=int, default=2, help="serving workers (>= 2: one is killed)")
    p.add_argument("--base-model", default=None, help="a local model folder (default: the bundled MiniLM)")
    p.add_argument("--no-kill", action="store_true", help="do not kill a serving worker")
    p.add_argument("--kill-pool-holder", action="store_true",
                   help="kill the serving worker that runs the training pool (default: another one)")
    p.add_argument("--job-grace", type=float, default=240.0, help="seconds after the run for jobs to finish")
    p.add_argument("--respawn-timeout", type=float, default=120.0,
                   help="the run goes on until the killed worker is back, at most this long after the kill")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers < 2 and not args.no_kill:
        p.error("--workers must be at least 2 to kill one (or pass --no-kill)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole soak; returns the result (also written to ``args.out`` with a PNG beside it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = load_base(args.base_model).spec
    plan = Plan(seconds=args.seconds, warmup=args.warmup, clients=args.clients, rate=args.rate,
                hostile_clients=args.hostile_clients,
                churn_every=args.churn_every, job_every=args.job_every,
                kill_at=None if args.no_kill else args.warmup + 0.25 * (args.seconds - args.warmup),
                kill_pool_holder=args.kill_pool_holder, max_requests=1_000_000, job_rows=32,
                job_hyperparameters=JOB_HYPERPARAMETERS, workers=args.workers, job_grace=args.job_grace,
                respawn_timeout=args.respawn_timeout, seed=args.seed)
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="tailor-soak-") as tmp:
        server = SoakServer(Path(tmp) / "home", free_port(), workers=args.workers, train_workers=1,
                            base_model=args.base_model)
        try:
            server.wait_ready(timeout=300)
            hostile = new_tenant(server.url, ADMIN_KEY, HOSTILE)
            asyncio.run(every_worker_ready(server, hostile, args.workers, timeout=300))
            phase("start")
            import_versions(server.url, hostile, spec, args.tenants, 1)
            tenants = create_tenants(server.url, ADMIN_KEY, spec, args.tenants, args.versions)
            phase("tenants")
            asyncio.run(prime(server, tenants))
            phase("prime")
            timeline = Timeline(initial={t.name: 1 for t in tenants})
            soak = Soak(server, tenants, hostile, texts(64, seed=args.seed), plan, timeline)
            rec = asyncio.run(soak.run())
            finished = time.monotonic()
            phases["run"] = round(rec.end - rec.start, 1)
            phases["jobs_after_run"] = round(finished - rec.end, 1)
            orphans = server.orphans()
        finally:
            mark = time.monotonic()
            left_behind = server.stop()
            phase("stop")
            log_tail = server.log_tail(40)
    result = summarise(rec, plan, timeline, tenants, finished, orphans, left_behind)
    if not result["ok"]:
        result["server_log_tail"] = log_tail.splitlines()
    result = {"machine": machine(), "model": spec.name or args.base_model, "quick": args.quick,
              "config": {**{k: v for k, v in asdict(plan).items() if k != "max_requests"}, "tenants": args.tenants,
                         "versions": args.versions, "warmup_s": args.warmup}, "phases_s": phases,
              **result}
    write(args.out, result)
    plot(args.out.with_suffix(".png"), result)
    return result


async def every_worker_ready(server: SoakServer, tenant: Tenant, workers: int, timeout: float) -> None:
    """/readyz answers for one worker: wait until ``workers`` distinct workers answer a predict
    for an adapter the tenant lacks with 404, not 503 (new connections, so they spread): each
    has loaded the base model."""
    body = json.dumps({"adapter": ADAPTER, "inputs": ["hello"]}).encode()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout

    async def loop() -> None:
        conn = Connection(server.host, server.port)
        while len(seen) < workers and time.monotonic() < deadline:
            try:
                r = await conn.request("POST", "/v1/predict", body, key=tenant.key, close=True)
            except TransportError:
                continue
            if r.status == 404:
                seen.add(r.worker)

    await asyncio.gather(*(loop() for _ in range(3)))
    if len(seen) < workers:
        raise RuntimeError(f"only workers {sorted(seen)} of {workers} became ready in {timeout:.0f}s")


async def prime(server: SoakServer, tenants: list[Tenant], rounds: int = 3, concurrency: int = 6) -> None:
    """Touch every tenant's every version a few times on new connections, so both workers hold
    the adapters before the run (RSS growth then measures leaks, not first loads)."""
    work = [(t, v) for _ in range(rounds) for t in tenants for v in t.versions]

    async def loop(i: int) -> None:
        conn = Connection(server.host, server.port)
        for t, v in work[i::concurrency]:
            body = json.dumps({"adapter": f"{ADAPTER}@{v}", "inputs": ["hello"]}).encode()
            try:
                await conn.request("POST", "/v1/predict", body, key=t.key, close=True)
            except TransportError:
                pass

    await asyncio.gather(*(loop(i) for i in range(concurrency)))


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    result = run(args)
    failed = [k for k, v in result["checks"].items() if not v["ok"]]
    print(json.dumps({k: v["value"] for k, v in result["checks"].items()}, indent=1))
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
