"""Prometheus metrics of the service (plain prometheus-client; they show on BentoML's /metrics).

BentoML runs its workers with prometheus-client's multiprocess mode on, so counters and
histograms from every worker are summed on scrape; gauges say how they combine
(``livesum``: the sum over live workers). Endpoint labels are route templates
(``/v1/adapters/{name}``), never raw paths. What an engine does (predictions, batches, the
resident adapter cache) carries a ``task`` label: each task has its own engine and batcher.
A ``tenant`` label is added only when ``TAILOR_METRICS_TENANT_LABELS=1`` (it multiplies series
by the tenant count).

Text generation (``tailor_generation_*``, label ``task``): time to first token and inter-token
latency histograms (from the engine's hooks), tokens generated, requests by finish reason (and
``cancelled``), and gauges of active sequences, waiting requests (queue depth) and KV-cache bytes
in use and budgeted, copied from ``GenerationEngine.stats()`` by ``sync_generation`` (a
background thread calls it twice a second). With ``TAILOR_METRICS_TENANT_LABELS=1`` time to
first token, inter-token latency and tokens generated carry ``tenant`` too, as the classifiers'
request and row counters do (never the adapter or model: a tenant may make any number; tenants
are made by the operator). The engine does not know the caller, so they are then measured
where it is known, in the OpenAI routes (``request_tokens``), as the tokens reach the route:
first token from the request's submission (its wait for KV room included) to its first text,
and each later text's wait spread over the tokens it carries; the engine's hooks then count
nothing there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

from adapters.jobs.model import STATUSES, JobDurations
from adapters.runtime.cache import CacheStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# training runs take seconds (tiny data) to hours
JOB_SECONDS_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

log = logging.getLogger("tailor.service")
_lock = threading.Lock()
_metrics: Metrics | None = None


class Metrics:
    def __init__(self, tenant_labels: bool = False) -> None:
        self.tenant_labels = tenant_labels
        t = ["task", "tenant"] if tenant_labels else ["task"]
        self.requests = Counter("tailor_http_requests", "HTTP requests by route template and status",
                                ["endpoint", "method", "status"])
        self.latency = Histogram("tailor_http_request_duration_seconds", "HTTP request latency",
                                 ["endpoint", "method"], buckets=_LATENCY_BUCKETS)
        self.predict_requests = Counter("tailor_predict_requests", "Predict requests served", t)
        self.predict_rows = Counter("tailor_predict_rows", "Rows (texts, images) classified", t)
        task = ["task"]
        self.batch_size = Histogram("tailor_batch_size", "Rows per merged forward pass", task,
                                    buckets=_BATCH_BUCKETS)
        self.batch_adapters = Histogram("tailor_batch_adapters", "Distinct adapters per merged forward pass", task,
                                        buckets=_BATCH_BUCKETS)
        self.batch_seconds = Histogram("tailor_batch_seconds", "Forward time per merged batch (all its passes: texts of very different lengths run as a few)", task,
                                       buckets=_LATENCY_BUCKETS)
        self.forward_threads = Counter("tailor_forward_threads", "Merged forward passes by the torch threads they "
                                       "ran with (a pass may borrow cores idle workers leave)", ["task", "threads"])
        self.cache_hits = Counter("tailor_adapter_cache_hits", "Resident adapter cache hits", task)
        self.cache_misses = Counter("tailor_adapter_cache_misses", "Resident adapter cache misses", task)
        self.cache_evictions = Counter("tailor_adapter_cache_evictions", "Adapters evicted from the resident set",
                                       task)
        self.cache_load_errors = Counter("tailor_adapter_load_errors", "Adapter loads that failed", task)
        self.resident = Gauge("tailor_adapters_resident", "Adapters resident in host memory", task,
                              multiprocess_mode="livesum")
        self.resident_bytes = Gauge("tailor_adapters_resident_bytes", "Bytes of resident adapters", task,
                                    multiprocess_mode="livesum")
        self.load_seconds = Histogram("tailor_adapter_load_seconds", "Time to load an adapter from the store",
                                      task, buckets=_LOAD_BUCKETS)
        self.jobs = Gauge("tailor_jobs", "Fine-tuning jobs by status (whole database)", ["status"],
                          multiprocess_mode="mostrecent")
        # A histogram of the whole database's finished jobs, read from it like tailor_jobs (so a
        # job is counted once however many workers, replicas or training nodes there are);
        # exposed as gauges, which histogram_quantile() reads like any _bucket series.
        self.job_seconds_bucket = Gauge("tailor_job_training_seconds_bucket",
                                        "Finished jobs that ran at most le seconds, by status", ["status", "le"],
                                        multiprocess_mode="mostrecent")
        self.job_seconds_sum = Gauge("tailor_job_training_seconds_sum", "Seconds finished jobs ran, by status",
                                     ["status"], multiprocess_mode="mostrecent")
        self.job_seconds_count = Gauge("tailor_job_training_seconds_count", "Finished jobs that ran, by status",
                                       ["status"], multiprocess_mode="mostrecent")
        self.nonfinite_adapters = Counter("tailor_adapter_nonfinite_outputs",
                                          "Adapter versions found giving non-finite outputs (each once per worker)")
        self.refused_rows = Counter("tailor_predict_refused", "Predict requests refused before queueing",
                                    ["reason"])
        self.ready = Gauge("tailor_ready", "1 once every enabled task's base model is loaded and its engine built",
                           multiprocess_mode="livemin")
        self.time_to_first_token = Histogram(
            "tailor_generation_time_to_first_token_seconds",
            "From a request's submission (its wait for KV room included) to its first token", t,
            buckets=_LATENCY_BUCKETS)
        self.inter_token = Histogram("tailor_generation_inter_token_seconds", "Between a sequence's tokens", t,
                                     buckets=_TOKEN_BUCKETS)
        self.tokens_generated = Counter("tailor_generation_tokens", "Tokens generated (every sequence)", t)
        self.generation_requests = Counter("tailor_generation_requests", "Generation requests by how they ended",
                                           ["task", "finish_reason"])
        self.active_sequences = Gauge("tailor_generation_active_sequences", "Sequences being decoded", task,
                                      multiprocess_mode="livesum")
        self.queue_depth = Gauge("tailor_generation_waiting_requests", "Requests waiting for room in the KV cache",
                                 task, multiprocess_mode="livesum")
        self.kv_cache_bytes = Gauge("tailor_generation_kv_cache_bytes", "KV-cache bytes allocated", task,
                                    multiprocess_mode="livesum")
        self.kv_cache_budget = Gauge("tailor_generation_kv_cache_budget_bytes", "KV-cache budget in bytes", task,
                                     multiprocess_mode="livesum")
        self.change_polls = Counter("tailor_change_log_polls", "Polls of the registry's change log (one feed per worker)")
        self.change_poll_failures = Counter("tailor_change_log_poll_failures",
                                            "Change-log polls that failed (the registry was unreachable)")
        self.change_poll_waits = Counter("tailor_change_log_poll_waits",
                                         "Requests that waited for the change-log poll in flight instead of querying")
        self._feed_seen = (0, 0, 0)  # the feed's polls, failures, waits already counted
        self._seen: dict[str, CacheStats] = {}  # by task: the counts already turned into increments
        self._tokens_seen: dict[str, int] = {}  # by task: engine tokens already counted
        self._sync_lock = threading.Lock()

    def predicted(self, task: str, tenant: str, rows: int) -> None:
        """One predict request of ``rows`` rows answered."""
        labels = (task, tenant) if self.tenant_labels else (task,)
        self.predict_requests.labels(*labels).inc()
        self.predict_rows.labels(*labels).inc(rows)

    def observe_batch(self, task: str, size: int, n_adapters: int, seconds: float) -> None:
        self.batch_size.labels(task).observe(size)
        self.batch_adapters.labels(task).observe(n_adapters)
        self.batch_seconds.labels(task).observe(seconds)

    def observe_threads(self, task: str, threads: int) -> None:
        """The last forward pass of ``task`` ran with ``threads`` torch threads."""
        self.forward_threads.labels(task, str(threads)).inc()

    def observe_load(self, task: str, seconds: float) -> None:
        self.load_seconds.labels(task).observe(seconds)

    def report_nonfinite(self, key: object) -> None:
        """An adapter version's outputs were not finite: its rows failed, no other row did."""
        self.nonfinite_adapters.inc()
        log.warning("adapter %s produced non-finite outputs; its requests fail with 409 until "
                    "another version is promoted", key)

    def sync_cache(self, task: str, stats: CacheStats) -> None:
        """Turn the ``task`` engine's cache counts into counter increments (cheap; call often)."""
        with self._sync_lock:
            seen = self._seen.setdefault(task, CacheStats())
            for name, counter in (("hits", self.cache_hits), ("misses", self.cache_misses),
                                  ("evictions", self.cache_evictions), ("load_errors", self.cache_load_errors)):
                now, before = getattr(stats, name), getattr(seen, name)
                if now > before:
                    counter.labels(task).inc(now - before)
                    setattr(seen, name, now)
            self.resident.labels(task).set(stats.resident)
            self.resident_bytes.labels(task).set(stats.resident_bytes)

    def sync_changes(self, polls: int, failures: int, waits: int) -> None:
        """Turn a change feed's counts (``adapters.change_feed.ChangeFeed``) into counter
        increments (cheap; the worker's background ``Freshener`` calls it every round)."""
        with self._sync_lock:
            for counter, now, before in zip((self.change_polls, self.change_poll_failures, self.change_poll_waits),
                                            (polls, failures, waits), self._feed_seen, strict=True):
                if now > before:
                    counter.inc(now - before)
            self._feed_seen = (max(polls, self._feed_seen[0]), max(failures, self._feed_seen[1]),
                               max(waits, self._feed_seen[2]))

    def first_token(self, task: str, seconds: float) -> None:
        """The engine's hook (not with tenant labels: ``request_tokens`` counts then)."""
        if not self.tenant_labels:
            self.time_to_first_token.labels(task).observe(seconds)

    def next_token(self, task: str, seconds: float) -> None:
        """The engine's hook (not with tenant labels: ``request_tokens`` counts then)."""
        if not self.tenant_labels:
            self.inter_token.labels(task).observe(seconds)

    def request_tokens(self, task: str, tenant: str, tokens: int, *, first: float | None, gap: float) -> None:
        """With tenant labels: ``tokens`` tokens of one of ``tenant``'s requests reached its route;
        ``first``: seconds from its submission when they hold its first token (the others came
        with it: 0 s apart), else None; ``gap``: seconds since its previous tokens arrived, spread
        over these. Without tenant labels the engine's hooks count and this does nothing."""
        if not self.tenant_labels or tokens < 1:
            return
        self.tokens_generated.labels(task, tenant).inc(tokens)
        if first is not None:
            self.time_to_first_token.labels(task, tenant).observe(first)
        each = 0.0 if first is not None else gap / tokens
        for _ in range(tokens - (first is not None)):
            self.inter_token.labels(task, tenant).observe(each)

    def generation_ended(self, task: str, finish_reason: str) -> None:
        """One generation request ended: ``stop``, ``length``, ``cancelled`` or ``error``."""
        self.generation_requests.labels(task, finish_reason).inc()

    def sync_generation(self, task: str, stats: Mapping[str, int]) -> None:
        """Copy a generation engine's ``stats()`` into the gauges and the token counter."""
        with self._sync_lock:
            tokens, before = int(stats.get("tokens_generated", 0)), self._tokens_seen.get(task, 0)
            if tokens > before and not self.tenant_labels:  # with them, request_tokens counts
                self.tokens_generated.labels(task).inc(tokens - before)
                self._tokens_seen[task] = tokens
        self.active_sequences.labels(task).set(stats.get("active_sequences", 0))
        self.queue_depth.labels(task).set(stats.get("waiting_requests", 0))
        self.kv_cache_bytes.labels(task).set(stats.get("kv_cache_bytes", 0))
        self.kv_cache_budget.labels(task).set(stats.get("kv_cache_budget_bytes", 0))

    def set_jobs(self, counts: dict[str, int]) -> None:
        for status in (*STATUSES, *counts):
            self.jobs.labels(status).set(counts.get(status, 0))

    def set_job_durations(self, durations: list[JobDurations]) -> None:
        for d in durations:
            for bound, n in zip(JOB_SECONDS_BUCKETS, d.at_most, strict=True):
                self.job_seconds_bucket.labels(d.status, str(bound)).set(n)
            self.job_seconds_bucket.labels(d.status, "+Inf").set(d.count)
            self.job_seconds_sum.labels(d.status).set(d.total_seconds)
            self.job_seconds_count.labels(d.status).set(d.count)


def get_metrics(tenant_labels: bool = False) -> Metrics:
    """The process's metrics (created once: prometheus-client refuses duplicate names)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics(tenant_labels)
        return _metrics
