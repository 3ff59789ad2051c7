"""HTTP benchmark: the real served process under closed-loop load from many tenants.

    python -m bench.http [--quick] --out bench/results/http-cpu.json

Starts ``bentoml serve .`` on 127.0.0.1 (bundled MiniLM, its own TAILOR_HOME, no training
workers; serving workers as by default, ``TAILOR_WORKERS=auto``: one single-threaded worker
per core on CPU; ``--workers`` overrides), creates 100 tenants through the admin API, gives
each an adapter (r=8 on query/value), then runs closed-loop clients (each sends one single-text predict for a
random tenant, waits for the answer, sends the next) at concurrency 1, 16 and 64.

Each phase's keep-alive connections are spread evenly over the server's serving workers
(``balanced_connections``; the kernel alone often put all 16 on one worker).

Reported per concurrency: requests/s, p50/p95/p99 latency, the server's mean merged batch
size (from its /metrics), and ``ratio_vs_engine``: HTTP rows/s divided by the engine's own
in-process rows/s (``Engine.classify`` on batches of the service's max batch size, distinct
adapters per row) measured in this process right before and after that HTTP phase. Phases
alternate with engine measurements so machine noise hits both alike. The load generator
shares the machine's cores with the server: on a 2-core box that costs the HTTP side.

At one client the batched figure is not what a lone client could ever get (one row at a time
cannot be batched), so the 1-client phase also reports ``ratio_vs_engine_one_client``: HTTP
requests/s divided by the in-process engine serving the same closed loop (``Engine.classify``
of one row, then the next), measured right before and right after the HTTP phases of that
round and averaged, with both p50s. The engine runs with one
torch thread and with every core in turn and the faster counts (on a busy machine the
many-thread forward collapses). That ratio is the served path's overhead at low load. Beside
it, from the server's /metrics over each phase: ``server_forward_ms`` (mean time of a merged
forward pass in the server) and ``server_forward_threads`` (passes by the torch threads they
ran with: a worker borrows idle cores only when the machine has them idle at that instant), so
a gap between the two sides can be told apart: forward threads, or the HTTP path around it.

``--runtime torch,onnx`` serves this checkout once per ``TAILOR_RUNTIME`` (``--quantize int8``
for ONNX's), interleaved like a baseline; ONNX graphs (the universal one and the tenants'
query/value variant) are built into each server's home before it starts, never while timed.

``--split-cost auto,0`` serves this checkout once per ``TAILOR_SPLIT_COST_TOKENS`` (the engine's
width groups on and off; the first reported at the top level, the others as ``split-N``),
interleaved like a baseline. ``--long-share F`` makes that fraction of the requests carry a long
text (a film-review-like text of 300-400 words, cut to its adapter's ``max_length``) among the
16-40-word ones, and ``--long-max-length N`` records ``max_length`` N in every tenant's adapter
(default: none, so the base's 128), for mixed-length traffic: with one long row, one pass pads the
whole merged batch to it.

``--baseline-repo DIR`` serves a second checkout (e.g. ``git archive`` of an older commit)
beside this one, on the next port with its own home and tenants, and runs every HTTP phase
on both in alternating order: a before/after comparison in one run, under the same load.
Per-round ratios are kept (``runs``) so their spread can be quoted.
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
from dataclasses import replace
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


def texts(n: int, seed: int = 0, words: tuple[int, int] = (16, 40)) -> list[str]:
    """Review-like sentences of 16-40 words (about 20-50 tokens; ``words`` other bounds), seeded."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


LONG_WORDS = (300, 400)  # --long-share's texts: past 256 tokens, so cut at any max_length up to it


def mixed_corpus(n: int, long_share: float, seed: int = 0) -> list[str]:
    """``n`` short texts plus long ones (``LONG_WORDS``) making ``long_share`` of the corpus, in
    seeded order: a client drawing uniformly sends a long text with that probability."""
    if not 0 <= long_share < 1:
        raise SystemExit(f"--long-share must be in [0, 1), got {long_share}")
    corpus = texts(n, seed)
    rng = random.Random(seed)
    for text in texts(round(n * long_share / (1 - long_share)), seed + 1, LONG_WORDS):
        corpus.insert(rng.randrange(len(corpus) + 1), text)
    return corpus


class Server:
    """``bentoml serve .`` of ``repo`` in its own process group; stopped with SIGTERM."""

    def __init__(self, home: Path, port: int, max_wait_ms: float, workers: str = "auto",
                 repo: Path = REPO, runtime: str = "torch", quantize: str = "none",
                 extra_env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TAILOR_HOME": str(home), "TAILOR_ADMIN_KEY": ADMIN_KEY, "TAILOR_WORKERS": workers,
               "TAILOR_RUNTIME": runtime, "TAILOR_QUANTIZE": quantize,
               "TAILOR_TRAIN_WORKERS": "0", "TAILOR_MAX_BATCH_SIZE": str(MAX_BATCH),
               "TAILOR_MAX_WAIT_MS": str(max_wait_ms), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "BENTOML_DO_NOT_TRACK": "True", **(extra_env or {})}
        env = instance_env(env, port)  # its own metrics folder (BentoML's default is shared per user)
        exe = Path(sys.executable).parent / "bentoml"
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bentoml"]
        self.log_path = home / "serve.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([*cmd, "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
                                     cwd=repo, env=env, stdout=open(self.log_path, "wb"),
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


def batch_stats(url: str) -> dict[str, float]:
    """The server's merged-batch counters, summed over tasks: ``size_sum``/``size_count`` (rows
    per pass), ``seconds_sum``/``seconds_count`` (time per pass) and ``threads_N`` (passes that
    ran with N torch threads)."""
    body = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r"tailor_batch_(size|seconds)_(sum|count)(\{[^}]*\})? ([0-9.e+]+)", line)
        if m:
            key = f"{m.group(1)}_{m.group(2)}"
            out[key] = out.get(key, 0.0) + float(m.group(4))
        m = re.match(r'tailor_forward_threads_total\{[^}]*threads="(\d+)"[^}]*\} ([0-9.e+]+)', line)
        if m:
            out[f"threads_{m.group(1)}"] = out.get(f"threads_{m.group(1)}", 0.0) + float(m.group(2))
    return out


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server did between two ``batch_stats``: mean rows and milliseconds per merged
    pass, and how many passes ran with each torch-thread count."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    passes = max(1.0, d.get("size_count", 0.0))
    return {"mean_batch_size": d.get("size_sum", 0.0) / passes,
            "server_forward_ms": 1e3 * d.get("seconds_sum", 0.0) / max(1.0, d.get("seconds_count", 0.0)),
            "server_forward_threads": {k.removeprefix("threads_"): int(v) for k, v in sorted(d.items())
                                       if k.startswith("threads_") and v > 0}}


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


async def worker_connection(host: str, port: int, body: bytes, key: str) -> tuple[RawConnection, bytes]:
    """A new keep-alive connection and the serving worker that accepted it (its X-Tailor-Worker,
    learned from one predict)."""
    conn = RawConnection(host, port)
    return conn, (await conn.post("/v1/predict", body, key))[2]


async def balanced_connections(host: str, port: int, n: int, workers: int, body: bytes, key: str,
                               tries: int = 8) -> list[RawConnection]:
    """``n`` keep-alive connections spread evenly over the server's ``workers`` (a connection stays
    with the worker that accepted it, and which one does is the kernel's choice: left alone, 16
    connections split 16/0 as often as 8/8 and the 16-client figure swung with it). Each new
    connection sends one request to learn its worker and is opened again, up to ``tries`` times,
    while that worker already has its share."""
    share = -(-n // max(1, workers))
    count: dict[bytes, int] = {}
    conns: list[RawConnection] = []
    for _ in range(n):
        for attempt in range(tries):
            conn, worker = await worker_connection(host, port, body, key)
            if count.get(worker, 0) < share or attempt == tries - 1:
                count[worker] = count.get(worker, 0) + 1
                conns.append(conn)
                break
            await conn.close()
    return conns


async def count_workers(url: str, key: str, body: bytes, probes: int = 12) -> int:
    """How many serving workers answer on ``url``: distinct X-Tailor-Worker over new connections."""
    host, port = url.split("//", 1)[1].split(":")
    seen: set[bytes] = set()
    for _ in range(probes):
        conn, worker = await worker_connection(host, int(port), body, key)
        seen.add(worker)
        await conn.close()
    return len(seen)


async def closed_loop(url: str, keys: list[str], corpus: list[str], concurrency: int,
                      seconds: float, warmup: float, workers: int | None = None) -> dict[str, Any]:
    """``concurrency`` clients, each with one request in flight at a time, for ``seconds``; with
    ``workers``, their connections are spread evenly over that many serving workers first."""
    host, port = url.split("//", 1)[1].split(":")
    latencies: list[float] = []
    errors: dict[int, int] = {}
    by_worker: dict[str, int] = {}
    bodies = [json.dumps({"adapter": "clf", "inputs": [t]}).encode() for t in corpus]
    conns = (await balanced_connections(host, int(port), concurrency, workers, bodies[0], keys[0])
             if workers else [RawConnection(host, int(port)) for _ in range(concurrency)])
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds

    async def one_client(i: int) -> None:
        rng = random.Random(i)
        conn = conns[i]
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
    """In-process rows/s: batches of MAX_BATCH rows, each row its own tenant's adapter (with fewer
    tenants than that, tenants repeat within a batch)."""
    rng = random.Random(1)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        picks = (rng.sample(range(len(adapters)), MAX_BATCH) if len(adapters) >= MAX_BATCH
                 else [rng.randrange(len(adapters)) for _ in range(MAX_BATCH)])
        engine.classify([rng.choice(corpus) for _ in picks], [adapters[i] for i in picks])
        done += MAX_BATCH
    return done / (time.perf_counter() - t0)


def engine_one_client(engine: Engine, adapters: list[Any], corpus: list[str], seconds: float) -> dict[str, Any]:
    """In-process, one client: one single-row ``classify`` for a random tenant, then the next;
    with one torch thread and with this process's default (every core), half the time each.
    The faster is the reference (``rows_per_s``): on a machine busy with other work the
    many-thread forward collapses (see ``adapters.runtime.core_share``), and the served path
    must not look good merely because the engine was measured at its worst."""
    rng = random.Random(2)
    default = torch.get_num_threads()
    by_threads: dict[int, dict[str, float]] = {}
    try:
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            ms: list[float] = []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds / 2:
                t = time.perf_counter()
                engine.classify([rng.choice(corpus)], [adapters[rng.randrange(len(adapters))]])
                ms.append((time.perf_counter() - t) * 1e3)
            by_threads[threads] = {"rows_per_s": len(ms) / (time.perf_counter() - t0), "p50_ms": percentile(ms, 0.5)}
    finally:
        torch.set_num_threads(default)
    best = max(by_threads, key=lambda n: by_threads[n]["rows_per_s"])
    return {**by_threads[best], "threads": best, "by_threads": {str(n): v for n, v in by_threads.items()}}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--port", type=int, default=3917)
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the service's micro-batch wait")
    p.add_argument("--workers", default="auto", help="the service's TAILOR_WORKERS (default: auto)")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma list of client counts")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--runtime", default="torch",
                   help="TAILOR_RUNTIME; a comma list (torch,onnx) serves this checkout once per runtime, interleaved "
                        "(the first reported at the top level, the others under their names)")
    p.add_argument("--quantize", default="none", help="TAILOR_QUANTIZE of the onnx runtime's servers")
    p.add_argument("--baseline-repo", type=Path, default=None,
                   help="also serve this checkout, interleaved with this one (before/after in one run)")
    p.add_argument("--split-cost", default=None,
                   help="TAILOR_SPLIT_COST_TOKENS; a comma list (auto,0) serves this checkout once per value, interleaved")
    p.add_argument("--long-share", type=float, default=0.0, help="fraction of requests with a long text (300-400 words)")
    p.add_argument("--long-max-length", type=int, default=None, help="max_length recorded in every tenant's adapter")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seconds, warmup, rounds = (6.0, 2.0, 1) if args.quick else (20.0, 3.0, 3)
    rounds = args.rounds or rounds
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    corpus = mixed_corpus(256, args.long_share)
    with tempfile.TemporaryDirectory(prefix="tailor-http-") as tmp:
        home = Path(tmp)
        base = load_base()
        runtimes = args.runtime.split(",")
        splits = args.split_cost.split(",") if args.split_cost else [None]
        first = {} if splits[0] is None else {"TAILOR_SPLIT_COST_TOKENS": splits[0]}
        repos = {"this": (REPO, runtimes[0], first), **{rt: (REPO, rt, first) for rt in runtimes[1:]},
                 **{f"split-{v}": (REPO, runtimes[0], {"TAILOR_SPLIT_COST_TOKENS": v}) for v in splits[1:]},
                 **({"baseline": (args.baseline_repo.resolve(), runtimes[0], first)} if args.baseline_repo else {})}
        for name, (_, rt, _) in repos.items():  # ONNX graphs built before serving, not during the timed phases
            if rt != "torch":
                from adapters.runtime.onnx.runtime import build_graphs

                build_graphs(base, "int8" if args.quantize == "int8" else "fp32", home / name / "graphs",
                             [frozenset(random_artifact(base.spec, seed=0).weights.lora)])
        servers = {name: Server(home / name, args.port + i, args.max_wait_ms, args.workers, repo, rt, args.quantize, env)
                   for i, (name, (repo, rt, env)) in enumerate(repos.items())}
        try:
            keys: dict[str, list[str]] = {}
            catalog: Catalog | None = None
            for name, server in servers.items():
                server.wait_ready()
                cat = Catalog(Registry(f"sqlite:///{home / name / 'tailor.db'}"), LocalStore(home / name / "store"))
                keys[name] = setup_tenants(server.url, cat, base.spec, args.tenants, args.long_max_length)
                catalog = catalog or cat
                asyncio.run(closed_loop(server.url, keys[name], corpus, 16, 3.0, 0.0))  # cold loads, warm caches
            assert catalog is not None
            engine = Engine(base, catalog)
            adapters = [engine.acquire(engine.resolve(f"t{i:03d}", "clf")) for i in range(args.tenants)]
            engine_rows_per_s(engine, adapters, corpus, 2.0)
            body = json.dumps({"adapter": "clf", "inputs": [corpus[0]]}).encode()
            workers = {n: asyncio.run(count_workers(s.url, keys[n][0], body)) for n, s in servers.items()}
            result = run_phases({n: (s.url, keys[n]) for n, s in servers.items()}, corpus, engine, adapters,
                                seconds, warmup, rounds, concurrency, workers)
            result["serving_workers"] = workers
        finally:
            for server in servers.values():
                server.stop()
    result = {"machine": machine(), "model": base.spec.name, "tenants": args.tenants, "rows_per_request": 1,
              "max_batch_size": MAX_BATCH, "max_wait_ms": args.max_wait_ms, "workers": args.workers,
              "torch_threads_engine": torch.get_num_threads(), "seconds_per_phase": seconds,
              "rounds": rounds, "quick": args.quick, "runtimes": args.runtime, "quantize": args.quantize,
              "split_cost": args.split_cost or "default", "long_share": args.long_share,
              "long_words": list(LONG_WORDS), "adapter_max_length": args.long_max_length,
              **({"baseline_repo": str(args.baseline_repo)} if args.baseline_repo else {}), **result}
    write(args.out, result)
    plot(args.out.with_suffix(".png"), result)


def setup_tenants(url: str, catalog: Catalog, spec: Any, n: int, max_length: int | None = None) -> list[str]:
    """``n`` tenants made through the admin API, each with a promoted random adapter ``clf``
    (recording ``max_length`` when given); their API keys."""
    keys = []
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for i in range(n):
            r = admin.post("/v1/tenants", json={"name": f"t{i:03d}"})
            r.raise_for_status()
            keys.append(r.json()["api_key"])
            # published as another process would (a training worker): the service sees it via the registry
            art = random_artifact(spec, seed=i, n_labels=2 + i % 4)
            if max_length is not None:
                art = replace(art, manifest=replace(art.manifest, max_length=max_length))
            catalog.publish(f"t{i:03d}", "clf", art, promote=True)
    return keys


def one_client_reference(run: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """The in-process one-client engine beside an HTTP phase: the mean of its measurements right
    before and right after that phase (``engine_one_client_rows_per_s``; each side the faster of
    its thread counts, both kept under ``engine_one_client_sides``), and the served phase's
    ``ratio_vs_engine_one_client`` against it. One side alone let a burst of other work on the
    box during that one measurement move the ratio by a third (0.75 vs 1.07 in two rounds)."""
    run["engine_one_client_rows_per_s"] = (before["rows_per_s"] + after["rows_per_s"]) / 2
    run["engine_one_client_p50_ms"] = (before["p50_ms"] + after["p50_ms"]) / 2
    run["engine_one_client_threads"] = [before["threads"], after["threads"]]
    run["engine_one_client_sides"] = {"before": before, "after": after}
    run["ratio_vs_engine_one_client"] = run["rows_per_s"] / run["engine_one_client_rows_per_s"]


def run_phases(servers: dict[str, tuple[str, list[str]]], corpus: list[str], engine: Engine, adapters: list[Any],
               seconds: float, warmup: float, rounds: int,
               concurrency: tuple[int, ...] = CONCURRENCY, workers: dict[str, int] | None = None) -> dict[str, Any]:
    """Every round, per concurrency: the engine (batched; and one client at c=1), then each
    server's HTTP phase, the servers' order alternating by round. ``servers``: name -> (url, keys);
    "this" is reported at the top level, any other under its name. ``workers``: name -> how many
    serving workers it has (connections are spread evenly over them)."""
    engine_runs: list[float] = [engine_rows_per_s(engine, adapters, corpus, seconds / 2)]
    per: dict[str, dict[int, list[dict[str, Any]]]] = {n: {c: [] for c in concurrency} for n in servers}
    names = list(servers)
    for rnd in range(rounds):
        for c in concurrency:
            one = engine_one_client(engine, adapters, corpus, seconds / 2) if c == 1 else None
            for name in (names if rnd % 2 == 0 else names[::-1]):
                url, keys = servers[name]
                before = batch_stats(url)
                run = asyncio.run(closed_loop(url, keys, corpus, c, seconds, warmup, (workers or {}).get(name)))
                run.update(stats_delta(before, batch_stats(url)))
                per[name][c].append(run)
            if one is not None:  # measured again after the HTTP phases: noise hits both sides alike
                after = engine_one_client(engine, adapters, corpus, seconds / 2)
                for name in names:
                    one_client_reference(per[name][c][-1], one, after)
            engine_runs.append(engine_rows_per_s(engine, adapters, corpus, seconds / 2))
            for name in names:  # the batched engine figures on either side of this concurrency's phases
                run = per[name][c][-1]
                run["engine_rows_per_s"] = (engine_runs[-2] + engine_runs[-1]) / 2
                run["ratio_vs_engine"] = run["rows_per_s"] / run["engine_rows_per_s"]
                extra = (f", engine 1-client p50 {run['engine_one_client_p50_ms']:.1f} ms, ratio_vs_engine_one_client "
                         f"{run['ratio_vs_engine_one_client']:.3f}") if "ratio_vs_engine_one_client" in run else ""
                print(f"[{name}] c={c:>3}: {run['requests_per_s']:.1f} req/s, p50 {run['p50_ms']:.1f} ms, "
                      f"p99 {run['p99_ms']:.1f} ms, batch {run['mean_batch_size']:.1f}, "
                      f"server forward {run['server_forward_ms']:.1f} ms with threads {run['server_forward_threads']}, "
                      f"ratio_vs_engine {run['ratio_vs_engine']:.3f}{extra}, by worker {run['requests_by_worker']}, "
                      f"errors {run['errors']}", flush=True)
    out: dict[str, Any] = {"engine_rows_per_s": engine_runs}
    for name in names:
        summary: dict[str, dict[str, Any]] = {}
        for c, runs in per[name].items():
            keys = ["requests_per_s", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "p99_over_p50",
                    "mean_batch_size", "server_forward_ms", "engine_rows_per_s", "ratio_vs_engine"]
            if c == 1:
                keys += ["engine_one_client_rows_per_s", "engine_one_client_p50_ms", "ratio_vs_engine_one_client"]
            summary[str(c)] = {k: median([r[k] for r in runs]) for k in keys}
            for k in ("ratio_vs_engine", "ratio_vs_engine_one_client"):
                if k in runs[0]:
                    summary[str(c)][k + "_range"] = [min(r[k] for r in runs), max(r[k] for r in runs)]
            summary[str(c)]["errors"] = sum(sum(r["errors"].values()) for r in runs)
            summary[str(c)]["requests"] = sum(r["requests"] for r in runs)
        block = {"concurrency": summary, "runs": {str(c): r for c, r in per[name].items()}}
        if name == "this":
            out.update(block)
        else:
            out[name] = block
    out["targets"] = {"ratio_vs_engine_at_64": ">= 0.85", "ratio_vs_engine_one_client": ">= 0.8",
                      "p99_over_p50": "<= 3"}
    return out


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
    for name, block in result.items():  # the other servers of the run: baseline, runtimes, split-N
        if isinstance(block, dict) and "concurrency" in block:
            other = block["concurrency"]
            lat.plot(cs, [other[str(c)]["p50_ms"] for c in cs], marker="x", linestyle=":", label=f"p50, {name}")
            thr.plot(cs, [other[str(c)]["rows_per_s"] for c in cs], marker="x", linestyle=":", label=f"HTTP, {name}")
    if "1" in conc and "engine_one_client_rows_per_s" in conc["1"]:
        thr.plot([1], [conc["1"]["engine_one_client_rows_per_s"]], marker="^", linestyle="none",
                 label=f"engine in-process, one client ({conc['1']['ratio_vs_engine_one_client']:.2f}x)")
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
