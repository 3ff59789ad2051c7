"""HTTP benchmark: the real served process under closed-loop load from many tenants.

    python -m bench.http [--quick] --out bench/results/http-cpu.json

Starts ``bentoml serve .`` on 127.0.0.1 (bundled MiniLM, its own TAILOR_HOME, no training
workers; serving workers as by default, ``TAILOR_WORKERS=auto``: one single-threaded worker
per core on CPU; ``--workers`` overrides), creates 100 tenants through the admin API, gives
each an adapter (r=8 on query/value), then runs closed-loop clients (each sends one single-text predict for a
random tenant, waits for the answer, sends the next) at concurrency 1, 16 and 64.

Reported per concurrency: requests/s, p50/p95/p99 latency, the server's mean merged batch
size (from its /metrics), and ``ratio_vs_engine``: HTTP rows/s divided by the engine's own
in-process rows/s (``Engine.classify`` on batches of the service's max batch size, distinct
adapters per row) measured in this process right before and after that HTTP phase. Phases
alternate with engine measurements so machine noise hits both alike. The load generator
shares the machine's cores with the server: on a 2-core box that costs the HTTP side.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from adapters.base import load_base
from adapters.catalog import Catalog
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from bench.common import machine, median, parser, percentile, save_figure, write
from service.instance import instance_env

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-0123456789"
CONCURRENCY = (1, 16, 64)
MAX_BATCH = 32
WORDS = ("the service was quick and the staff were friendly but the food arrived cold and late "
         "we would come back for the view though the prices are high and parking is hard to find "
         "great value excellent support terrible update broken screen lovely colours fast delivery").split()


def texts(n: int, seed: int = 0) -> list[str]:
    """Review-like sentences of 16-40 words (about 20-50 tokens), seeded."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 40))) for _ in range(n)]


class Server:
    """``bentoml serve .`` in its own process group; stopped with SIGTERM."""

    def __init__(self, home: Path, port: int, max_wait_ms: float, workers: str = "auto") -> None:
        env = {**os.environ, "TAILOR_HOME": str(home), "TAILOR_ADMIN_KEY": ADMIN_KEY, "TAILOR_WORKERS": workers,
               "TAILOR_TRAIN_WORKERS": "0", "TAILOR_MAX_BATCH_SIZE": str(MAX_BATCH),
               "TAILOR_MAX_WAIT_MS": str(max_wait_ms), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "BENTOML_DO_NOT_TRACK": "True"}
        env = instance_env(env, port)  # its own metrics folder (BentoML's default is shared per user)
        exe = Path(sys.executable).parent / "bentoml"
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bentoml"]
        self.log_path = home / "serve.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([*cmd, "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
                                     cwd=REPO, env=env, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"service not ready after {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's merged-batch-size histogram."""
    body = httpx.get(f"{url}/metrics", timeout=10).text
    total = count = 0.0
    for line in body.splitlines():
        m = re.match(r"tailor_batch_size_(sum|count)(\{[^}]*\})? ([0-9.e+]+)", line)
        if m:
            if m.group(1) == "sum":
                total += float(m.group(3))
            else:
                count += float(m.group(3))
    return total, count


class RawConnection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: a general-purpose client
    (httpx) costs ~13 ms of CPU per request here, enough to make the load generator, not
    the server, the bottleneck on a 2-core machine. This one costs well under 1 ms."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, key: str) -> tuple[int, bytes, bytes]:
        """(status, body, the X-Tailor-Worker header: which serving worker answered)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, close, worker = 0, False, b""
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"x-tailor-worker":
                worker = value.strip()
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data, worker

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def closed_loop(url: str, keys: list[str], corpus: list[str], concurrency: int,
                      seconds: float, warmup: float) -> dict[str, Any]:
    """``concurrency`` clients, each with one request in flight at a time, for ``seconds``."""
    host, port = url.split("//", 1)[1].split(":")
    latencies: list[float] = []
    errors: dict[int, int] = {}
    by_worker: dict[str, int] = {}
    bodies = [json.dumps({"adapter": "clf", "inputs": [t]}).encode() for t in corpus]
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds

    async def one_client(i: int) -> None:
        rng = random.Random(i)
        conn = RawConnection(host, int(port))
        try:
            while (now := time.perf_counter()) < end:
                t0 = time.perf_counter()
                status, _, worker = await conn.post("/v1/predict", rng.choice(bodies),
                                                    keys[rng.randrange(len(keys))])
                t1 = time.perf_counter()
                by_worker[worker.decode()] = by_worker.get(worker.decode(), 0) + 1
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1
                elif now >= measure_from and t1 <= end:
                    latencies.append(t1 - t0)
        finally:
            await conn.close()

    await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    ms = [x * 1e3 for x in latencies]
    p50, p99 = percentile(ms, 0.5), percentile(ms, 0.99)
    return {"requests": len(ms), "requests_per_s": len(ms) / seconds, "rows_per_s": len(ms) / seconds,
            "p50_ms": p50, "p95_ms": percentile(ms, 0.95), "p99_ms": p99, "p99_over_p50": p99 / p50,
            "errors": errors,
            # keep-alive connections stay with the worker that accepted them: this shows the split
            "requests_by_worker": sorted(by_worker.values(), reverse=True)}


def engine_rows_per_s(engine: Engine, adapters: list[Any], corpus: list[str], seconds: float) -> float:
    """In-process rows/s: batches of MAX_BATCH rows, each row its own tenant's adapter."""
    rng = random.Random(1)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        picks = rng.sample(range(len(adapters)), MAX_BATCH)
        engine.classify([rng.choice(corpus) for _ in picks], [adapters[i] for i in picks])
        done += MAX_BATCH
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--port", type=int, default=3917)
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the service's micro-batch wait")
    p.add_argument("--workers", default="auto", help="the service's TAILOR_WORKERS (default: auto)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seconds, warmup, rounds = (6.0, 2.0, 1) if args.quick else (20.0, 3.0, 3)
    corpus = texts(256)
    with tempfile.TemporaryDirectory(prefix="tailor-http-") as tmp:
        home = Path(tmp)
        base = load_base()
        catalog = Catalog(Registry(f"sqlite:///{home / 'tailor.db'}"), LocalStore(home / "store"))
        server = Server(home, args.port, args.max_wait_ms, args.workers)
        try:
            server.wait_ready()
            keys = setup_tenants(server.url, catalog, base.spec, args.tenants)
            engine = Engine(base, catalog)
            adapters = [engine.acquire(engine.resolve(f"t{i:03d}", "clf")) for i in range(args.tenants)]
            asyncio.run(closed_loop(server.url, keys, corpus, 16, 3.0, 0.0))  # cold loads, warm caches
            engine_rows_per_s(engine, adapters, corpus, 2.0)
            result = run_phases(server.url, keys, corpus, engine, adapters, seconds, warmup, rounds)
        finally:
            server.stop()
    result = {"machine": machine(), "model": base.spec.name, "tenants": args.tenants, "rows_per_request": 1,
              "max_batch_size": MAX_BATCH, "max_wait_ms": args.max_wait_ms, "workers": args.workers,
              "torch_threads_engine": torch.get_num_threads(), "seconds_per_phase": seconds,
              "rounds": rounds, **result}
    write(args.out, result)
    plot(args.out.with_suffix(".png"), result)


def setup_tenants(url: str, catalog: Catalog, spec: Any, n: int) -> list[str]:
    keys = []
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for i in range(n):
            r = admin.post("/v1/tenants", json={"name": f"t{i:03d}"})
            r.raise_for_status()
            keys.append(r.json()["api_key"])
            # published as another process would (a training worker): the service sees it via the registry
            catalog.publish(f"t{i:03d}", "clf", random_artifact(spec, seed=i, n_labels=2 + i % 4), promote=True)
    return keys


def run_phases(url: str, keys: list[str], corpus: list[str], engine: Engine, adapters: list[Any],
               seconds: float, warmup: float, rounds: int) -> dict[str, Any]:
    engine_runs: list[float] = [engine_rows_per_s(engine, adapters, corpus, seconds / 2)]
    per_c: dict[int, list[dict[str, Any]]] = {c: [] for c in CONCURRENCY}
    for _ in range(rounds):
        for c in CONCURRENCY:
            s0, n0 = batch_stats(url)
            run = asyncio.run(closed_loop(url, keys, corpus, c, seconds, warmup))
            s1, n1 = batch_stats(url)
            run["mean_batch_size"] = (s1 - s0) / max(1.0, n1 - n0)
            engine_runs.append(engine_rows_per_s(engine, adapters, corpus, seconds / 2))
            # the engine figures on either side of this phase
            run["engine_rows_per_s"] = (engine_runs[-2] + engine_runs[-1]) / 2
            run["ratio_vs_engine"] = run["rows_per_s"] / run["engine_rows_per_s"]
            per_c[c].append(run)
            print(f"c={c:>3}: {run['requests_per_s']:.1f} req/s, p50 {run['p50_ms']:.1f} ms, "
                  f"p99 {run['p99_ms']:.1f} ms, batch {run['mean_batch_size']:.1f}, "
                  f"ratio_vs_engine {run['ratio_vs_engine']:.3f}, by worker {run['requests_by_worker']}, "
                  f"errors {run['errors']}")
    summary = {}
    for c, runs in per_c.items():
        summary[str(c)] = {k: median([r[k] for r in runs]) for k in
                           ("requests_per_s", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "p99_over_p50",
                            "mean_batch_size", "engine_rows_per_s", "ratio_vs_engine")}
        summary[str(c)]["errors"] = sum(sum(r["errors"].values()) for r in runs)
        summary[str(c)]["requests"] = sum(r["requests"] for r in runs)
    return {"engine_rows_per_s": engine_runs, "concurrency": summary, "runs": {str(c): r for c, r in per_c.items()},
            "targets": {"ratio_vs_engine_at_64": ">= 0.7", "p99_over_p50": "<= 3"}}


def plot(png: Path, result: dict[str, Any]) -> None:
    """Two panels: latency by concurrency, and HTTP rows/s beside the engine's in-process rows/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = result["concurrency"]
    cs = sorted(int(c) for c in conc)
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        lat.plot(cs, [conc[str(c)][key] for c in cs], marker="o", label=label)
    lat.set_ylabel("latency, ms")
    thr.plot(cs, [conc[str(c)]["rows_per_s"] for c in cs], marker="o", label="HTTP (bentoml serve)")
    thr.plot(cs, [conc[str(c)]["engine_rows_per_s"] for c in cs], marker="s", linestyle="--",
             label="engine in-process, batches of 32")
    for c in cs:
        thr.annotate(f"{conc[str(c)]['ratio_vs_engine']:.2f}x", (c, conc[str(c)]["rows_per_s"]),
                     textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    thr.set_ylabel("rows per s")
    thr.set_ylim(bottom=0)
    for ax in (lat, thr):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"HTTP predict, {result['tenants']} tenants, {result['machine']['cpu_count']} cores, "
                 f"workers={result.get('workers', '1')} (medians of {result['rounds']} rounds)")
    save_figure(fig, png)


if __name__ == "__main__":
    main()
