"""Cluster benchmark: tenant affinity vs round robin on the local multi-replica run.

    python -m bench.cluster [--quick] --out bench/results/cluster-cpu.json

Starts ``deploy.local.cluster`` (PostgreSQL, moto S3, 2 serving replicas on the bundled
MiniLM, NGINX), creates ``--tenants`` tenants with one adapter each, and gives every replica
a resident cache smaller than the tenant count (``--resident``), as a large deployment has:
more tenants than one replica can keep warm. Then closed-loop clients (one single-text
predict in flight each, random tenant) run through the router's affinity port (consistent
hash of the Authorization header) and its round-robin port, alternating, same load.

Reported per mode: requests/s, p50/p99 latency, and the adapter cache hit rate summed over
replicas (from each replica's /metrics, the deltas over the phase). Also the time from a
``promote`` answered by one replica to the new version being served by the other (target
< 1 s): p50 and max over repeated promotions.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from adapters.base import load_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.store import open_store
from adapters.synthetic import random_artifact
from bench.common import machine, median, parser, percentile, write
from bench.http import closed_loop, texts
from deploy.local.cluster import S3_KEYS, Cluster, free_port


def cache_counts(url: str) -> tuple[float, float]:
    body = httpx.get(f"{url}/metrics", timeout=10).text
    hits = sum(float(m.group(1)) for m in re.finditer(r"^tailor_adapter_cache_hits_total(?:\{[^}]*\})? (\S+)$",
                                                      body, re.M))
    misses = sum(float(m.group(1)) for m in re.finditer(
        r"^tailor_adapter_cache_misses_total(?:\{[^}]*\})? (\S+)$", body, re.M))
    return hits, misses


def total_counts(cluster: Cluster) -> tuple[float, float]:
    pairs = [cache_counts(cluster.replica_url(i)) for i in range(cluster.replicas)]
    return sum(h for h, _ in pairs), sum(m for _, m in pairs)


def phase(cluster: Cluster, url: str, keys: list[str], corpus: list[str], concurrency: int,
          seconds: float) -> dict[str, Any]:
    h0, m0 = total_counts(cluster)
    run = asyncio.run(closed_loop(url, keys, corpus, concurrency, seconds, 1.0))
    h1, m1 = total_counts(cluster)
    hits, misses = h1 - h0, m1 - m0
    run["cache_hits"], run["cache_misses"] = hits, misses
    run["cache_hit_rate"] = hits / max(1.0, hits + misses)
    # ~1 when each replica's /metrics are its own; replicas sharing one metrics folder counted
    # each other's lookups (and wiped them at start): a sanity check on the hit rate's inputs
    run["cache_lookups_per_request"] = (hits + misses) / max(1, run["requests"])
    return run


def promotion_delay(cluster: Cluster, key: str, catalog: Catalog, spec: Any, rounds: int) -> list[float]:
    """Seconds from a promote answered by replica 0 to replica 1 serving that version."""
    delays = []
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30, headers=auth) as c:
        for i in range(rounds):
            v = catalog.publish("t000", "clf", random_artifact(spec, seed=1000 + i)).version
            r = c.post(f"{cluster.replica_url(0)}/v1/adapters/clf/promote", json={"version": v})
            r.raise_for_status()
            t0 = time.perf_counter()
            while True:
                got = c.post(f"{cluster.replica_url(1)}/v1/predict", json={"adapter": "clf", "inputs": ["x"]})
                if got.status_code == 200 and got.json()["version"] == v:
                    break
                if time.perf_counter() - t0 > 30:
                    raise TimeoutError(f"replica 1 never served version {v}")
                time.sleep(0.01)
            delays.append(time.perf_counter() - t0)
    return delays


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--resident", type=int, default=60, help="adapters each replica keeps resident")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    seconds, rounds = (8.0, 1) if args.quick else (20.0, 3)
    os.environ.update(S3_KEYS)
    corpus = texts(256)
    base = load_base()
    with tempfile.TemporaryDirectory(prefix="tailor-cluster-") as tmp:
        cluster = Cluster(Path(tmp), replicas=2, workers=0, port=free_port(),
                          extra_env={"TAILOR_MAX_RESIDENT": str(args.resident),
                                     "TAILOR_DEVICE_SLOTS": str(max(33, args.resident // 2))})
        with cluster:
            catalog = Catalog(Registry(cluster.database_url), open_store(cluster.store_url))
            keys = []
            with httpx.Client(base_url=cluster.url, timeout=60,
                              headers={"Authorization": f"Bearer {cluster.admin_key}"}) as admin:
                for i in range(args.tenants):
                    r = admin.post("/v1/tenants", json={"name": f"t{i:03d}"})
                    r.raise_for_status()
                    keys.append(r.json()["api_key"])
                    catalog.publish(f"t{i:03d}", "clf", random_artifact(base.spec, seed=i), promote=True)
            for url in (cluster.url, cluster.round_robin_url):  # warm-up: first loads, JIT paths
                asyncio.run(closed_loop(url, keys, corpus, args.concurrency, 4.0, 0.0))
            runs: dict[str, list[dict[str, Any]]] = {"affinity": [], "round_robin": []}
            for _ in range(rounds):
                for mode, url in (("affinity", cluster.url), ("round_robin", cluster.round_robin_url)):
                    run = phase(cluster, url, keys, corpus, args.concurrency, seconds)
                    runs[mode].append(run)
                    print(f"{mode:>11}: {run['requests_per_s']:.1f} req/s, p50 {run['p50_ms']:.1f} ms, "
                          f"p99 {run['p99_ms']:.1f} ms, cache hit rate {run['cache_hit_rate']:.3f}", flush=True)
            delays = promotion_delay(cluster, keys[0], catalog, base.spec, 5 if args.quick else 20)
    summary = {mode: {k: median([r[k] for r in rs]) for k in
                      ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "cache_hit_rate",
                                "cache_lookups_per_request")}
               for mode, rs in runs.items()}
    result = {
        "machine": machine(), "quick": args.quick, "model": base.spec.name, "replicas": 2, "tenants": args.tenants,
        "resident_per_replica": args.resident, "concurrency": args.concurrency, "seconds_per_phase": seconds,
        "rounds": rounds, "modes": summary, "runs": runs,
        "affinity_vs_round_robin": {
            "requests_per_s": summary["affinity"]["requests_per_s"] / summary["round_robin"]["requests_per_s"],
            "p99_ms": summary["affinity"]["p99_ms"] / summary["round_robin"]["p99_ms"]},
        "promotion_visible_s": {"p50": percentile(delays, 0.5), "max": max(delays), "all": delays,
                                "target": "< 1 s"},
    }
    write(args.out, result)
    plot(args.out.with_suffix(".png"), result)


def plot(png: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_figure

    modes = list(result["modes"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, key, label in zip(axes, ("requests_per_s", "p99_ms", "cache_hit_rate"),
                              ("requests/s", "p99 latency (ms)", "adapter cache hit rate")):
        ax.bar(modes, [result["modes"][m][key] for m in modes], color=["tab:green", "tab:gray"])
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result['tenants']} tenants, {result['replicas']} replicas, "
                 f"{result['resident_per_replica']} resident adapters each")
    save_figure(fig, png)


if __name__ == "__main__":
    main()
