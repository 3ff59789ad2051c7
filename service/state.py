"""Everything one serving worker holds: database, store, keys, and per task a base, engine, batcher.

``TailorState.open(settings)`` connects what is cheap (database, store, key store, files,
jobs) at once, so tenant administration works from the first second; ``load()`` then loads
one frozen base per enabled task (``TAILOR_TASKS``: text and image classification by default)
and builds its engine and micro-batcher (seconds); text generation, when enabled, gets a
``GenerationEngine`` instead (continuous batching on its own scheduler thread, no micro-batcher),
kept in ``engines`` beside the others so adapter changes and freshness reach it too. Rows of
different tasks never share a forward pass: each task has its own engine (device slots,
resident adapters) and batcher.
``ready`` turns true only when every enabled base is loaded; routes that need a model answer
503 until then, and 422 ``task_not_served`` for a task this deployment does not enable.

A registry database that cannot be reached at start does not stop the process: ``open``
logs one line per attempt ("registry database at <url without password> unreachable:
<reason>; retrying in Ns") and ``load`` keeps retrying with backoff (up to
``db_retry_max_s``) until it answers and its schema is migrated; only then are the engine
built and the training pool started. Meanwhile ``/readyz`` is 503 and routes that touch the
database answer 503 ``database_unavailable``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from adapters.base import load_base
from adapters.catalog import Catalog
from adapters.change_feed import ChangeFeed
from adapters.jobs.files import Files
from adapters.jobs.manager import JobManager
from adapters.jobs.supervisor import WorkerPool, worker_command
from adapters.key_cache import KeyCache
from adapters.keys import KeyStore
from adapters.quotas import TenantQuotas
from adapters.registry import Registry
from adapters.schema import safe_url
from adapters.runtime.batcher import MicroBatcher
from adapters.runtime.compute_thread import ComputeThread, run_lent
from adapters.runtime.core_share import CoreShare, instance_path
from adapters.runtime.engine import Engine, EngineConfig
from adapters.runtime.memory import HeapTrimmer
from adapters.runtime.resolver import Freshener
from adapters.store import AdapterStore, open_store
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, TEXT_GENERATION
from service.errors import ApiError
from service.metrics import Metrics, get_metrics
from service.settings import Settings

if TYPE_CHECKING:
    from adapters.generation.engine import GenerationEngine
    from adapters.generation.scheduler import StepRunner

log = logging.getLogger("tailor.service")


class RateLimiter:
    """Per-tenant token buckets: ``rate`` requests/s with a burst of one second's worth.

    The rate is the tenant's ``requests_per_second`` quota when set, else the service-wide
    ``TAILOR_RATE_LIMIT`` (default 50); 0 means unlimited. Buckets live in each worker process.
    A refusal is a 429 whose Retry-After (whole seconds, 1..``MAX_RETRY_AFTER``) is when the
    next token is due. Checked right after the key, before the body is read or queued.
    A quota is re-read ``QUOTA_TTL`` s after it was read, off the request path: ``check`` keeps
    using it and ``refresh_stale`` (the worker's background ``Freshener``) re-reads it; only a
    tenant never seen, or not seen for ``QUOTA_MAX_AGE`` s, is read before its request.
    """

    QUOTA_TTL = 5.0
    QUOTA_MAX_AGE = 30.0
    MAX_RETRY_AFTER = 3600

    def __init__(self, default_rate: float, registry: Registry) -> None:
        self.default_rate = default_rate
        self.registry = registry
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)
        self._rates: dict[str, tuple[float, float]] = {}  # tenant -> (rate, fetched at)
        self._used: set[str] = set()  # tenants checked since their quota was last read
        self._lock = threading.Lock()

    def needs_refresh(self, tenant: str, now: float | None = None) -> bool:
        """True when the tenant's quota should be read before its request (call ``refresh``
        first, off the event loop, to keep ``check`` free of I/O)."""
        cached = self._rates.get(tenant)
        return cached is None or (time.monotonic() if now is None else now) - cached[1] >= self.QUOTA_MAX_AGE

    def refresh(self, tenant: str) -> None:
        self._rate(tenant, time.monotonic(), force=True)

    def refresh_stale(self, now: float | None = None) -> None:
        """Re-read the quotas older than ``QUOTA_TTL`` of the tenants checked since their last read."""
        now = time.monotonic() if now is None else now
        for tenant in [t for t in list(self._used) if now - self._rates.get(t, (0.0, -math.inf))[1] >= self.QUOTA_TTL]:
            self._used.discard(tenant)
            self._rate(tenant, now, force=True)

    def _rate(self, tenant: str, now: float, force: bool = False) -> float:
        cached = self._rates.get(tenant)
        if not force and cached is not None:
            self._used.add(tenant)
            return cached[0]
        # fetched outside the bucket lock: a database round trip must not serialise requests
        try:
            quota = TenantQuotas.stored(self.registry.get_tenant(tenant).quotas).requests_per_second
        except Exception:  # noqa: BLE001 - a bad stored quota must not lock the tenant out
            quota = 0.0
        rate = quota or self.default_rate
        self._rates[tenant] = (rate, now)
        return rate

    def check(self, tenant: str) -> None:
        """Take one token or raise a 429 ApiError with Retry-After."""
        now = time.monotonic()
        rate = self._rate(tenant, now)
        with self._lock:
            if not rate > 0:
                return
            burst = max(1.0, rate)
            tokens, last = self._buckets.get(tenant, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return
            self._buckets[tenant] = (tokens, now)
            wait = (1.0 - tokens) / rate
        retry = min(self.MAX_RETRY_AFTER, max(1, math.ceil(wait)))
        raise ApiError(429, "rate_limited", f"too many requests: this tenant may make {rate:g} per second",
                       headers={"Retry-After": str(retry)})


@dataclass
class TailorState:
    settings: Settings
    metrics: Metrics
    registry: Registry
    store: AdapterStore
    catalog: Catalog
    keys: KeyStore
    key_cache: KeyCache
    limiter: RateLimiter
    files: Files
    jobs: JobManager
    pool: WorkerPool | None = None  # the training workers, in the one serving process that runs them
    engines: dict[str, Any] = field(default_factory=dict)  # by task, once every enabled base is loaded: an Engine,
    # or for text generation a GenerationEngine (require_generator)
    generation_metrics: Freshener | None = None  # copies the generation engine's stats into the gauges
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)  # by task, beside its engine
    load_error: str | None = None
    freshener: Freshener | None = None  # keeps the change feed and quotas fresh off the request path
    feed: ChangeFeed | None = None  # the one reader of the registry's change log: key cache and resolvers
    cores: CoreShare | None = None  # idle serving cores lent to a forward pass
    compute: ComputeThread | None = None  # the one thread every task's forward passes run on
    db_retry_initial_s: float = 1.0
    db_retry_max_s: float = 30.0
    _ready: threading.Event = field(default_factory=threading.Event)
    _db_ready: threading.Event = field(default_factory=threading.Event)
    _closing: threading.Event = field(default_factory=threading.Event)
    _db_delay: float = 0.0
    _db_next_try: float = 0.0

    @classmethod
    def open(cls, settings: Settings) -> TailorState:
        # No connection yet: the schema is migrated by connect_database, which may retry.
        registry = Registry(settings.database_url, migrate=False)
        store = open_store(settings.store_url)
        keys = KeyStore(registry.engine, migrate=False)
        feed = ChangeFeed(registry)  # one poll of the change log serves the key cache and every resolver
        state = cls(settings=settings, metrics=get_metrics(settings.metrics_tenant_labels), registry=registry,
                    store=store, catalog=Catalog(registry, store), keys=keys,
                    key_cache=KeyCache(keys, registry, feed=feed), feed=feed,
                    limiter=RateLimiter(settings.rate_limit, registry),
                    files=Files(registry.engine, store), jobs=JobManager(registry.engine, store))
        state.metrics.ready.set(0)
        state.connect_database(retry=False)
        return state

    # -- readiness ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def database_ready(self) -> bool:
        return self._db_ready.is_set()

    def connect_database(self, *, retry: bool = True) -> bool:
        """Migrate the schema (the first query); with ``retry``, keep trying until it works.

        Only an unreachable database is retried (``DatabaseUnavailableError``); anything else
        (a schema newer than this build, a bad URL) is a configuration error and raised.
        Returns whether the database is ready (False: not yet, or closed while waiting).
        """
        from adapters.errors import DatabaseUnavailableError

        while not self._db_ready.is_set():
            # Honour the delay the last failure announced, also across calls (open, then load).
            if self._closing.wait(max(0.0, self._db_next_try - time.monotonic())):
                return False
            try:
                self.registry.migrate()
            except DatabaseUnavailableError as e:
                self._db_delay = (min(self.db_retry_max_s, self._db_delay * 2) if self._db_delay
                                  else self.db_retry_initial_s)
                self._db_next_try = time.monotonic() + self._db_delay
                reason = e.message.removeprefix("the registry database is unavailable: ")
                log.warning("registry database at %s unreachable: %s; retrying in %gs",
                            safe_url(self.settings.database_url), reason, self._db_delay)
                if not retry:
                    return False
            else:
                if self._db_delay:
                    log.info("registry database at %s is reachable; schema is current",
                             safe_url(self.settings.database_url))
                self._db_ready.set()
        return True

    def load(self) -> None:
        """Wait for the database, then load each enabled task's base and build its engine and
        batcher (blocking; ``start_loading`` threads it). Ready once all are built."""
        s = self.settings
        if not self.connect_database():
            return
        torch.set_num_threads(serving_threads(s))
        config = EngineConfig(max_resident=s.max_resident, device_slots=s.device_slots,
                              max_batch_size=s.max_batch_size, split_cost_tokens=s.split_cost_tokens)
        engines, batchers = {}, {}
        self.cores = core_share(s)
        self.compute = ComputeThread()  # one OpenMP pool for every task's batcher (runtime.compute_thread)
        for task in s.tasks:
            if task == TEXT_GENERATION:
                continue  # below: no micro-batcher
            try:
                t0 = time.perf_counter()
                base = BASE_LOADERS[task](s)
                engine = Engine(base, self.catalog, config, on_load=partial(self.metrics.observe_load, task),
                                on_nonfinite=self.metrics.report_nonfinite, change_feed=self.feed)
                if s.runtime != "torch":  # ONNX Runtime behind the same engine; a base that cannot keeps torch
                    from adapters.runtime.onnx.runtime import RuntimeChoice, apply_runtime

                    apply_runtime(engine, RuntimeChoice(s.runtime, s.quantize), s.home / "graphs")
                batchers[task] = MicroBatcher(
                    engine, s.max_batch_size, s.max_wait_ms, on_batch=partial(self._on_batch, task),
                    announced_arrivals=True, max_queued_rows_per_tenant=s.max_queued_rows, cores=self.cores,
                    compute=self.compute)
            except Exception as e:
                self.load_error = f"{task} base: {type(e).__name__}: {e}"
                log.exception("loading the %s base model failed; the service stays unready", task)
                for batcher in batchers.values():
                    batcher.close()
                return
            engines[task] = engine
            log.info("loaded %s base model %r on %s (%s...) in %.1fs with %d torch threads", task, base.spec.name,
                     base.device, base.fingerprint[:19], time.perf_counter() - t0, torch.get_num_threads())
        if TEXT_GENERATION in s.tasks:
            try:
                t0 = time.perf_counter()
                engines[TEXT_GENERATION] = generation_engine(s, self.catalog, self.metrics, self.feed,
                                                             run_step=self.run_lent)
            except Exception as e:
                self.load_error = f"{TEXT_GENERATION} base: {type(e).__name__}: {e}"
                log.exception("loading the %s base model failed; the service stays unready", TEXT_GENERATION)
                for batcher in batchers.values():
                    batcher.close()
                return
            self.generation_metrics = Freshener(
                [lambda g=engines[TEXT_GENERATION]: self.metrics.sync_generation(TEXT_GENERATION, g.stats())], 0.5,
                name="tailor-generation-metrics")
            log.info("loaded %s base model %r in %.1fs", TEXT_GENERATION, engines[TEXT_GENERATION].base.spec.name,
                     time.perf_counter() - t0)
        self.engines, self.batchers = engines, batchers
        ahead = config.resolve_poll_seconds / 4  # poll a little before requests would have to
        feed = self.key_cache.feed
        self.freshener = Freshener([partial(feed.refresh_ahead, ahead), self.limiter.refresh_stale, HeapTrimmer(),
                                    lambda: self.metrics.sync_changes(feed.polls, feed.poll_failures, feed.waits)],
                                   ahead)
        self._ready.set()
        self.metrics.ready.set(1)
        log.info("ready: serving %s", ", ".join(s.tasks))

    def run_lent(self, fn: Callable[[], None]) -> None:
        """``fn`` (a generation step) on the compute thread, with idle cores lent as for a batch."""
        run_lent(self.compute, self.cores, fn)

    def _on_batch(self, task: str, size: int, n_adapters: int, seconds: float) -> None:
        """A merged forward pass of ``task`` ended (on its batcher's thread, right after it)."""
        self.metrics.observe_batch(task, size, n_adapters, seconds)
        if self.cores is not None:  # the threads it ran with: lent idle cores, or the worker's share
            self.metrics.observe_threads(task, self.cores.threads_of_last_lend)

    def start_loading(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="tailor-load", daemon=True)
        t.start()
        return t

    def require_engine(self, task: str, *, param: str | None = None) -> Engine:
        """The engine of ``task``: 422 ``task_not_served`` if this deployment does not enable the
        task (``param``: the request field that asked for it), 503 until the bases are loaded."""
        self.require_task(task, param=param)
        engine = self.engines.get(task)
        if engine is None or not self.ready:
            why = f" (loading failed: {self.load_error})" if self.load_error else "; retry shortly"
            raise ApiError(503, "not_ready", f"the base model is not loaded yet{why}",
                           headers={"Retry-After": "2"})
        return engine

    def require_task(self, task: str, *, param: str | None = None) -> None:
        """422 ``task_not_served`` unless this deployment enables ``task`` (``TAILOR_TASKS``)."""
        if task not in self.settings.tasks:
            raise ApiError(422, "task_not_served", f"this service does not serve {task} (it serves "
                           f"{', '.join(self.settings.tasks)})", param=param)

    def require_generator(self) -> GenerationEngine:
        """The text-generation engine: 422 ``task_not_served`` unless enabled, 503 until loaded."""
        engine: GenerationEngine = self.require_engine(TEXT_GENERATION, param="model")  # type: ignore[assignment]
        return engine

    def require_batcher(self, task: str) -> MicroBatcher:
        self.require_engine(task)  # built together with the batcher
        return self.batchers[task]

    def any_engine(self) -> Engine:
        """An engine of any served task: resolving names and reading versions is task-agnostic."""
        return self.require_engine(self.settings.tasks[0])

    def engine_caches(self) -> EngineCaches | None:
        """Every loaded engine, told together of adapter changes (None before any is loaded)."""
        return EngineCaches(list(self.engines.values())) if self.engines else None

    def require_jobs(self) -> tuple[Files, JobManager]:
        """Uploaded files and jobs (always there: the routes' way to reach both)."""
        return self.files, self.jobs

    # -- training workers -------------------------------------------------------------------

    def start_training_pool(self) -> None:
        """Start the local training workers once the database answers (at once if it does)."""
        if self.settings.train_workers <= 0:
            return
        if self._db_ready.is_set():
            self._start_training_pool()
            return

        def later() -> None:
            while not self._db_ready.wait(1.0):
                if self._closing.is_set():
                    return
            if not self._closing.is_set():
                self._start_training_pool()

        threading.Thread(target=later, name="tailor-pool-start", daemon=True).start()

    def _start_training_pool(self) -> None:
        s = self.settings
        pool = WorkerPool(self.jobs, worker_command(s, threads=training_threads(s)), size=s.train_workers,
                          lock_path=s.home / "workers.lock", log_path=s.home / "workers.log")
        if pool.start():  # only one serving process per TAILOR_HOME runs the pool
            self.pool = pool
            log.info("started %d training worker(s); their log: %s", s.train_workers, s.home / "workers.log")

    def close(self) -> None:
        self._closing.set()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        if self.freshener is not None:
            self.freshener.close()
        for batcher in self.batchers.values():
            batcher.close()
        if self.generation_metrics is not None:
            self.generation_metrics.close()
        generator = self.engines.get(TEXT_GENERATION)
        if generator is not None:
            generator.close()  # stops its scheduler thread; streams still open end with an error
        if self.compute is not None:  # after every user of it
            self.compute.close()
        if self.cores is not None:
            self.cores.close()
        self.registry.close()


@dataclass(frozen=True)
class EngineCaches:
    """Several engines as one ``adapters.change_listener.AdapterCaches``: an adapter change or
    deletion reaches whichever engine (task) holds the adapter."""

    engines: list[Engine]

    def refresh(self, tenant: str, adapter: str | None = None) -> None:
        for engine in self.engines:
            engine.refresh(tenant, adapter)

    def forget(self, tenant: str, adapter: str | None = None) -> None:
        for engine in self.engines:
            engine.forget(tenant, adapter)


def load_image_base(setting: str | None) -> Any:
    """The vision base ``TAILOR_IMAGE_BASE_MODEL`` names: the bundled EfficientNet-Lite0 (None),
    a checkpoint directory, or ``tiny[:SEED]`` (a tiny random network of the same layout)."""
    from adapters.vision.backbone import vision_base_from_setting

    return vision_base_from_setting(setting)


def generation_engine(s: Settings, catalog: Catalog, metrics: Metrics,
                      feed: ChangeFeed | None = None, run_step: StepRunner | None = None) -> GenerationEngine:
    """The text-generation engine on ``TAILOR_GENERATION_BASE_MODEL`` (bases cached under
    ``TAILOR_HOME/bases``), its KV budget and admission wait from the settings, its hooks feeding
    the ``tailor_generation_*`` metrics, its steps run by ``run_step`` (the compute thread). Its
    scheduler thread runs while it has work or buffers, until ``close()``."""
    from adapters.generation.base import load_causal_base
    from adapters.generation.engine import GenerationConfig, GenerationEngine

    task = TEXT_GENERATION
    base = load_causal_base(s.generation_base_model, cache_dir=s.home / "bases")
    config = GenerationConfig(max_resident=s.max_resident, kv_budget_bytes=s.generation_kv_cache_bytes,
                              admission_timeout_s=s.generation_admission_timeout_s)
    return GenerationEngine(base, catalog, config, on_load=partial(metrics.observe_load, task),
                            on_first_token=partial(metrics.first_token, task),
                            on_token=partial(metrics.next_token, task),
                            on_finish=lambda usage, reason: metrics.generation_ended(task, reason),
                            change_feed=feed, run_step=run_step)


# How each task's base is loaded from the settings.
BASE_LOADERS: dict[str, Callable[[Settings], Any]] = {
    TEXT_CLASSIFICATION: lambda s: load_base(s.base_model),
    IMAGE_CLASSIFICATION: lambda s: load_image_base(s.image_base_model),
}


def training_threads(s: Settings) -> int:
    return s.train_threads or 1


# Each worker is a full base-model copy with its own adapter cache (~450 MB RSS with MiniLM):
# a default should not take gigabytes; TAILOR_WORKERS sets more.
MAX_AUTO_WORKERS = 4


def serving_cores(s: Settings) -> int:
    """The cores serving may use: all this process may use, less the training workers' threads."""
    cores = available_cpus()
    if s.train_workers > 0:
        cores -= s.train_workers * training_threads(s)
    return max(1, cores)


def serving_workers(s: Settings) -> int:
    """``TAILOR_WORKERS``, or when unset (``auto``): one worker on a GPU machine (one model
    copy per device), else one per serving core (up to ``MAX_AUTO_WORKERS``).

    On CPU, processes scale where threads do not: measured on 2 cores with 100 tenants at 64
    concurrent clients, 2 workers x 1 torch thread served 1.6-2x the requests/s of 1 worker x 2
    threads. In one process the event loop's request handling holds the GIL the forward pass
    needs between its ops, and a 2-thread forward stalls whenever either core is taken.
    """
    if s.workers is not None:
        return s.workers
    if torch.cuda.is_available():
        return 1
    return min(MAX_AUTO_WORKERS, serving_cores(s))


def core_share(s: Settings) -> CoreShare:
    """The idle cores this worker may borrow for a forward pass: from the other serving workers
    of its instance on CPU (``adapters.runtime.core_share``), none with one worker or a GPU."""
    share = serving_threads(s)
    if serving_workers(s) < 2 or torch.cuda.is_available():
        return CoreShare.disabled(share)
    return CoreShare(instance_path(), max(share, serving_cores(s)), share)


def serving_threads(s: Settings) -> int:
    """Torch threads per serving worker: the serving cores shared out among the workers.
    Serving keeps the cores the training workers do not use: measured on 2 cores, sharing
    them let a training job push predict p99 up 5.8x; split, p99 stayed at 0.8-1.0x idle."""
    return max(1, serving_cores(s) // serving_workers(s))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's
    ``limits.cpu``), so a 4-CPU pod on a 64-core node does not start 64 torch threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period) + 0.5)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
