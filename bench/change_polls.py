"""Change-log polls per serving worker, idle and under a light load, on a real served process.

    python -m bench.change_polls [--quick] --out bench/results/change-polls-cpu-quick.json \\
        [--baseline-repo DIR]

Serves ``bentoml serve .`` (bundled MiniLM, its own TAILOR_HOME, no training workers) with two
serving workers and counts, in every process, the SQL statements that read the registry's
``changes`` table (the change-log polls: ``change_seq`` and ``changes_since``, plus the seq a
cache reads before a miss). The count comes from a ``sitecustomize`` put on the served
process's PYTHONPATH: a SQLAlchemy ``before_cursor_execute`` listener on every engine that
writes its process's counts to a folder twice a second. It needs nothing from the code it
measures, so ``--baseline-repo DIR`` (a checkout of an older commit) is measured the same way,
served beside this one and measured in the same phases (before/after in one run).

Phases: ``idle`` (no requests at all: both servers at once) and ``busy`` (one closed-loop
client sending ``GET /v1/adapters`` with a tenant key on a new connection each time, so
requests spread over both workers and each authenticates; one server at a time). Reported per
phase and checkout: each worker's change-log statements per second and the workers' mean.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, parser, save_figure, write
from bench.http import ADMIN_KEY, REPO, Server

WORKERS = 2
SITECUSTOMIZE = '''
import json, os, threading, time
_dir = os.environ.get("TAILOR_BENCH_SQL_COUNTS")
if _dir:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    _counts = {"changes": 0, "all": 0}

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany):
        _counts["all"] += 1
        if "FROM changes" in statement:
            _counts["changes"] += 1

    def _dump():
        path = os.path.join(_dir, f"{os.getpid()}.json")
        while True:
            if _counts["all"]:
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({**_counts, "t": time.monotonic()}, f)
                os.replace(tmp, path)
            time.sleep(0.5)

    threading.Thread(target=_dump, name="bench-sql-counts", daemon=True).start()
'''


def snapshot(folder: Path) -> dict[str, dict[str, float]]:
    out = {}
    for f in folder.glob("*.json"):
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # being replaced: the next snapshot has it
    return out


def rates(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    """Change-log statements per second per process, between two snapshots."""
    out = {}
    for pid, b in before.items():
        a = after.get(pid)
        if a is not None and a["t"] > b["t"]:
            out[pid] = round((a["changes"] - b["changes"]) / (a["t"] - b["t"]), 2)
    return out


def wait_for_workers(folder: Path, timeout: float = 120.0) -> None:
    """Until ``WORKERS`` processes have queried the database (each loaded and polling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for s in snapshot(folder).values() if s["changes"] > 0) >= WORKERS:
            return
        time.sleep(0.5)
    raise RuntimeError(f"fewer than {WORKERS} workers polled within {timeout:.0f}s")


def tenant_key(url: str) -> str:
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        r = admin.post("/v1/tenants", json={"name": "poller", "quotas": {"requests_per_second": 100_000}})
        r.raise_for_status()
        return r.json()["api_key"]


def busy(url: str, key: str, seconds: float) -> int:
    """One closed-loop client, a new connection per request; returns how many were answered 200."""
    host, port = url.removeprefix("http://").split(":")
    ok, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("GET", "/v1/adapters", headers={"Authorization": f"Bearer {key}", "Connection": "close"})
            r = conn.getresponse()
            r.read()
            ok += r.status == 200
        finally:
            conn.close()
    return ok


def measure(folder: Path, seconds: float, load: Any = None) -> dict[str, Any]:
    before = snapshot(folder)
    t0 = time.monotonic()
    answered = load() if load is not None else None
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)) + 1.0)  # the window, plus one dump after it
    per_worker = {p: r for p, r in rates(before, snapshot(folder)).items()}
    workers = sorted(per_worker.values(), reverse=True)[:WORKERS]
    return {"polls_per_s_per_worker": per_worker, "mean_polls_per_s": round(sum(workers) / max(1, len(workers)), 2),
            **({"requests_answered": answered, "requests_per_s": round(answered / seconds, 1)}
               if answered is not None else {})}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=3947)
    p.add_argument("--baseline-repo", type=Path, default=None,
                   help="also serve this checkout, measured in the same phases (before/after in one run)")
    args = p.parse_args()
    seconds, rounds = (10.0, 1) if args.quick else (30.0, 3)
    repos = {"this": REPO, **({"baseline": args.baseline_repo.resolve()} if args.baseline_repo else {})}
    result: dict[str, Any] = {name: {"idle": [], "busy": []} for name in repos}
    with tempfile.TemporaryDirectory(prefix="tailor-polls-") as tmp:
        hook = Path(tmp) / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        servers, folders = {}, {}
        try:
            for i, (name, repo) in enumerate(repos.items()):
                folders[name] = Path(tmp) / f"counts-{name}"
                folders[name].mkdir()
                os.environ["TAILOR_BENCH_SQL_COUNTS"] = str(folders[name])
                os.environ["PYTHONPATH"] = str(hook)
                servers[name] = Server(Path(tmp) / name, args.port + i, 5.0, str(WORKERS), repo)
            keys = {}
            for name, server in servers.items():
                server.wait_ready()
                keys[name] = tenant_key(server.url)
                wait_for_workers(folders[name])
            for r in range(rounds):
                idle_before = {n: snapshot(f) for n, f in folders.items()}
                time.sleep(seconds + 1.0)  # every server idle at once
                for name, f in folders.items():
                    per_worker = rates(idle_before[name], snapshot(f))
                    top = sorted(per_worker.values(), reverse=True)[:WORKERS]
                    result[name]["idle"].append({"polls_per_s_per_worker": per_worker,
                                                 "mean_polls_per_s": round(sum(top) / max(1, len(top)), 2)})
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    result[name]["busy"].append(measure(folders[name], seconds,
                                                        lambda n=name: busy(servers[n].url, keys[n], seconds)))
        finally:
            for server in servers.values():
                server.stop()
            os.environ.pop("TAILOR_BENCH_SQL_COUNTS", None)
            os.environ.pop("PYTHONPATH", None)
    summary = {name: {phase: round(sum(x["mean_polls_per_s"] for x in runs) / len(runs), 2)
                      for phase, runs in phases.items()} for name, phases in result.items()}
    out = {"machine": machine(), "quick": args.quick, "workers": WORKERS, "seconds_per_phase": seconds,
           "rounds": rounds, **({"baseline_repo": str(args.baseline_repo)} if args.baseline_repo else {}),
           "mean_polls_per_s_per_worker": summary, "runs": result}
    write(args.out, out)
    plot(args.out.with_suffix(".png"), summary)


def plot(png: Path, summary: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    phases = ["idle", "busy"]
    width = 0.8 / len(summary)
    for i, (name, by_phase) in enumerate(summary.items()):
        xs = [j + i * width for j in range(len(phases))]
        bars = ax.bar(xs, [by_phase[ph] for ph in phases], width, label=name)
        ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(phases))], phases)
    ax.set_ylabel("change-log statements / s, per worker")
    ax.set_title(f"Change-log polls per serving worker ({WORKERS} workers)")
    ax.legend()
    save_figure(fig, png)


if __name__ == "__main__":
    main()
