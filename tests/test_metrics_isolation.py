"""Two real served instances on one host keep their own /metrics (issue 11, item 4).

BentoML puts every ``bentoml serve``'s multiprocess metrics in ``$BENTOML_HOME/
prometheus_multiproc_dir`` and wipes it at start; with one shared default folder, traffic to
one instance showed on the other's /metrics and starting one erased the other's numbers. Here
instance A is the session's ``served``, started like the local cluster starts its replicas
(``bentoml serve .`` with ``service.instance.instance_env``; it counts from where earlier tests
left it) and instance B like ``scripts/serve.sh`` does
(``tailor serve``): each counts only its own requests, and restarting B leaves A's counts whole.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from service.instance import instance_home
from tests.service_fixture import ADMIN_KEY, Served, start_served, stop_served

TAILOR_SERVE = [sys.executable, "-m", "service.cli", "serve"]


def tenant_listings(s: Served) -> float:
    """``GET /v1/tenants`` answered 200, as this instance's /metrics count them (0 if absent)."""
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        if name == "tailor_http_requests_total" and dict(re.findall(r'(\w+)="([^"]*)"', labels)) == {
                "endpoint": "/v1/tenants", "method": "GET", "status": "200"}:
            return float(value)
    return 0.0


def list_tenants(s: Served, times: int) -> None:
    with s.client(ADMIN_KEY) as c:
        for _ in range(times):
            assert c.get("/v1/tenants").status_code == 200


def metrics_files(home: Path, s: Served) -> list[str]:
    folder = instance_home(home, urlsplit(s.url).port or 0) / "prometheus_multiproc_dir"
    return sorted(p.name for p in folder.glob("*.db"))


def test_two_instances_on_one_host_keep_their_own_metrics(served: Served, tmp_path: Path) -> None:
    a = served  # the session's instance: its count so far is whatever earlier tests left
    a0 = tenant_listings(a)
    b: Served | None = None
    try:
        b = start_served(tmp_path / "b", a.model_dir, command=TAILOR_SERVE)
        list_tenants(a, 5)
        list_tenants(b, 2)
        assert (tenant_listings(a) - a0, tenant_listings(b)) == (5, 2)
        assert metrics_files(a.home, a) and metrics_files(tmp_path / "b", b)  # each in its own folder

        # restarting B (same home, same port) starts B afresh and leaves A's numbers alone
        port = urlsplit(b.url).port
        stop_served(b)
        b = start_served(tmp_path / "b", a.model_dir, command=TAILOR_SERVE, port=port)
        assert tenant_listings(b) == 0
        assert tenant_listings(a) - a0 == 5
        list_tenants(a, 1)
        assert (tenant_listings(a) - a0, tenant_listings(b)) == (6, 0)
    finally:
        if b is not None:
            stop_served(b)
