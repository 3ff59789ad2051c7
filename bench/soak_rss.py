"""Serving-worker RSS under the soak's traffic, several servers side by side (e.g. before/after).

    python -m bench.soak_rss --out bench/results/soak-rss-allocator.json \\
        --variant base=/path/to/old/checkout --variant new=. [--variant base_arena2=/old:MALLOC_ARENA_MAX=2]

Each variant is ``name=REPO[:ENV=VALUE,...]``: ``bentoml serve`` of that checkout with one
serving worker and no training worker, 12 tenants with 3 versions each (primed as the soak
does). Then, for ``--seconds``, every server at once gets the same traffic: 3 clients
predicting 1-4 texts for random tenants (0.1 s apart) and one client sending the soak's hostile
requests back to back. The serving worker's RSS is sampled every 5 s with the requests
answered so far. Reported per variant: RSS at start and end, growth in MB and per 1,000
requests; the JSON holds the series, the machine (load average included) and a PNG beside it.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bench.soak_server as soak_server
from adapters.base import load_base
from bench.common import machine, parser, save_figure, write
from bench.http import texts
from bench.soak import prime
from bench.soak_checks import ADAPTER
from bench.soak_client import Connection, TransportError
from bench.soak_load import Soak
from bench.soak_server import ADMIN_KEY, SoakServer, free_port
from bench.soak_tenants import HOSTILE, create_tenants, new_tenant


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition("=")
    repo, _, env = rest.partition(":")
    pairs = dict(item.split("=", 1) for item in env.split(",") if item)
    return name, Path(repo).resolve(), pairs


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, help="name=REPO[:ENV=VALUE,...]")
    p.add_argument("--seconds", type=float, default=300.0)
    args = p.parse_args()
    seconds = 60.0 if args.quick else args.seconds
    spec = load_base().spec
    tmp = Path(tempfile.mkdtemp(prefix="tailor-rss-"))
    servers: dict[str, SoakServer] = {}
    env_of: dict[str, Any] = {}
    try:
        for name, repo, env in map(parse_variant, args.variant):
            soak_server.REPO = repo  # the checkout this server runs
            servers[name] = SoakServer(tmp / name, free_port(), workers=1, train_workers=0, base_model=None,
                                       extra_env=env)
            env_of[name] = {"repo": str(repo), "env": env}
        worlds = {}
        for name, server in servers.items():
            server.wait_ready(timeout=600)
            hostile = new_tenant(server.url, ADMIN_KEY, HOSTILE)
            tenants = create_tenants(server.url, ADMIN_KEY, spec, 12, 3)
            asyncio.run(prime(server, tenants))
            worlds[name] = (server, tenants, Soak.hostile_requests(SimpleNamespace(hostile=hostile, tenants=tenants)))
        series = asyncio.run(load(worlds, texts(64), seconds))
    finally:
        for server in servers.values():
            server.stop()
    summary = {}
    for name, rows in series.items():
        requests = rows[-1]["legit"] + rows[-1]["hostile"]
        growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"]
        summary[name] = {"start_mb": rows[0]["rss_mb"], "end_mb": rows[-1]["rss_mb"], "growth_mb": round(growth, 1),
                         "requests": requests, "mb_per_1000_requests": round(1000 * growth / max(1, requests), 3)}
        print(name, summary[name], flush=True)
    result = {"machine": machine(), "quick": args.quick, "seconds": seconds, "variants": env_of,
              "summary": summary, "series": series}
    write(args.out, result)
    plot(args.out.with_suffix(".png"), result)


async def load(worlds: dict[str, Any], corpus: list[str], seconds: float) -> dict[str, list[dict[str, float]]]:
    counts = {name: {"legit": 0, "hostile": 0} for name in worlds}
    series: dict[str, list[dict[str, float]]] = {name: [] for name in worlds}
    end = time.monotonic() + seconds

    async def legit(name: str, i: int) -> None:
        server, tenants, _ = worlds[name]
        rng, conn = random.Random(i), Connection(server.host, server.port)
        while time.monotonic() < end:
            body = json.dumps({"adapter": ADAPTER, "inputs": [rng.choice(corpus) for _ in range(rng.randint(1, 4))]})
            try:
                await conn.request("POST", "/v1/predict", body.encode(), key=rng.choice(tenants).key)
                counts[name]["legit"] += 1
            except TransportError:
                conn = Connection(server.host, server.port)
            await asyncio.sleep(0.1)  # pacing

    async def hostile(name: str) -> None:
        server, _, kinds = worlds[name]
        conn, n = Connection(server.host, server.port), 0
        while time.monotonic() < end:
            _, body, key = kinds[n % len(kinds)]
            n += 1
            try:
                await conn.request("POST", "/v1/predict", body, key=key)
                counts[name]["hostile"] += 1
            except TransportError:
                conn = Connection(server.host, server.port)

    async def sample() -> None:
        t0 = time.monotonic()
        while time.monotonic() < end:
            for name, (server, _, _) in worlds.items():
                r = server.rss()
                mb = sum(v for pid, v in r.per_pid.items() if server.roles.get(pid) == "serving") / 2**20
                series[name].append({"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(mb, 1),
                                     **counts[name], "load_average": round(r.load_average, 2)})
            await asyncio.sleep(5)  # the sampling period

    await asyncio.gather(sample(), *(legit(n, i) for n in worlds for i in range(3)), *(hostile(n) for n in worlds))
    return series


def plot(png: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, rows in result["series"].items():
        ax.plot([r["t_s"] for r in rows], [r["rss_mb"] for r in rows], label=f"{name} ({rows[-1]['hostile']} hostile, "
                                                                          f"{rows[-1]['legit']} predicts)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("serving worker RSS, MB")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle("serving-worker RSS under the soak's traffic, variants side by side")
    save_figure(fig, png)


if __name__ == "__main__":
    main()
