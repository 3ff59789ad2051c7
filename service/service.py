"""Tailor as a BentoML service: ``bentoml serve .`` (see bentofile.yaml) or ``service.service:Tailor``.

The HTTP API is the FastAPI app of ``service.app`` mounted at ``/`` (routes ``/v1/...``, docs at
``/docs``); BentoML adds ``/healthz``, ``/readyz`` and ``/metrics``. Each worker opens the
database at once and loads one base model per enabled task (``TAILOR_TASKS``: text and image
classification by default) in the background: ``/readyz`` is 503 until every task's engine is
built, then 200.

Logging: the ``tailor`` loggers at INFO; BentoML's access log (one INFO line per request) only
with ``TAILOR_ACCESS_LOG=1``. Metrics: each instance should have its own BentoML home (our
launchers see to it, ``service.instance``); a worker that finds itself on the per-user
shared folder logs a warning.
"""

from __future__ import annotations

import logging
import os
import threading

import bentoml

from service.app import create_app
from service.instance import shares_default_dir
from service.metrics import JOB_SECONDS_BUCKETS
from service.request_timeout import install as install_request_timeout
from service.settings import Settings
from service.state import TailorState, serving_workers
from service.traffic_metrics import install as install_traffic_metrics

logging.getLogger("tailor").setLevel(logging.INFO)
# Invalid TAILOR_* values stop the start here, naming the variable. The admin key file (when
# TAILOR_ADMIN_KEY is unset) is made by the first worker, not by importers like `bentoml build`.
SETTINGS = Settings.from_env(admin_key=False)
app = create_app()
# BentoML's request timeout keeps every request for the whole timeout (service.request_timeout)
install_request_timeout()
# BentoML's per-request metrics of /v1/ paths are dropped from /metrics (__metrics__): not written either
install_traffic_metrics()


@bentoml.service(
    name="tailor",
    traffic={"timeout": 300},
    workers=serving_workers(SETTINGS),
    threads=SETTINGS.threads,
    logging={"access": {"enabled": SETTINGS.access_log}},
    # BentoML's OpenTelemetry middleware costs a small request ~15% of its CPU even with no
    # exporter: API routes are traced only when asked for (TAILOR_TRACING=1).
    tracing={"excluded_urls": [] if SETTINGS.tracing else ["/v1/"]},
)
@bentoml.asgi_app(app, path="/")
class Tailor:
    def __init__(self) -> None:
        if shares_default_dir():
            logging.getLogger("tailor.service").warning(
                "metrics go to BentoML's per-user default folder %s, which every other bentoml serve of "
                "this user shares and wipes at start: start with 'tailor serve' or scripts/serve.sh, or "
                "give this instance its own BENTOML_HOME", os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self.state = TailorState.open(SETTINGS.with_admin_key())
        app.state.tailor = self.state
        self.state.start_loading()
        self.state.start_training_pool()
        self._stop = threading.Event()
        threading.Thread(target=self._watch_jobs, name="tailor-job-metrics", daemon=True).start()

    def __is_ready__(self) -> bool:
        return self.state.ready

    def __metrics__(self, content: str) -> str:
        # BentoML labels its own request series by raw path (one series per adapter, job and
        # file id); ours (tailor_http_*) use route templates, so drop BentoML's for /v1/ paths.
        return "\n".join(line for line in content.split("\n")
                         if not (line.startswith("bentoml_") and 'endpoint="/v1/' in line))

    def _watch_jobs(self) -> None:
        while not self._stop.wait(5.0):
            if self.state.jobs is not None:
                try:
                    self.state.metrics.set_jobs(self.state.jobs.count_by_status())
                    self.state.metrics.set_job_durations(self.state.jobs.durations(JOB_SECONDS_BUCKETS))
                except Exception:  # noqa: BLE001 - metrics only
                    logging.getLogger("tailor.service").debug("job metrics failed", exc_info=True)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        self.state.close()
