"""Text generation's metrics with ``TAILOR_METRICS_TENANT_LABELS=1``, on a real ``bentoml serve``
of the tiny random Llama (text generation only), read from its ``/metrics``.

The classifiers' request and row counters carry a ``tenant`` label when it is on; so do time to
first token, inter-token latency and tokens generated (``service.metrics``): each tenant's
series count exactly its own requests' tokens (as ``usage`` reports them), streamed or whole,
and no series is labelled by anything a tenant names (adapter, model).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest

from tests.service_fixture import GENERATION, Served, generation_base, save_tiny_base, seed_bases, serving

METRICS = ("tailor_generation_tokens_total", "tailor_generation_time_to_first_token_seconds_count",
           "tailor_generation_inter_token_seconds_count")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("tenant-metrics")
    seed_bases(root / "home")
    overrides = {**GENERATION, "TAILOR_TASKS": "text-generation", "TAILOR_METRICS_TENANT_LABELS": "1"}
    with serving(root / "home", save_tiny_base(root / "model"), overrides) as s:
        yield s


def series(served: Served) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``METRICS`` as {name: {sorted labels: value}}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for line in httpx.get(f"{served.url}/metrics", timeout=30).text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\} (\S+)$", line)
        if m and m.group(1) in METRICS:
            out[m.group(1)][tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2))))] = float(m.group(3))
    return out


def tenant(served: Served, name: str) -> str:
    with served.client(served.admin_key) as admin:
        r = admin.post("/v1/tenants", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]


def completion_tokens(c: httpx.Client, path: str, body: dict[str, object]) -> int:
    if not body.get("stream"):
        r = c.post(path, json=body)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["completion_tokens"])
    body = {**body, "stream_options": {"include_usage": True}}
    with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        last = [line for line in r.iter_lines() if line.startswith("data: {")][-1]
    return int(json.loads(last[6:])["usage"]["completion_tokens"])


def test_generation_metrics_carry_the_tenant_when_tenant_labels_are_on(labelled: Served) -> None:
    model = generation_base().spec.name  # the base model's public name: no adapter needed
    keys = {"alpha": tenant(labelled, "alpha"), "beta": tenant(labelled, "beta")}
    want = {"alpha": 0, "beta": 0}
    requests = {"alpha": 0, "beta": 0}
    chat = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0}
    for name, calls in (("alpha", [("/v1/chat/completions", {**chat, "max_tokens": 5}),
                                   ("/v1/chat/completions", {**chat, "max_tokens": 7, "stream": True})]),
                        ("beta", [("/v1/completions", {"model": model, "prompt": "Once upon", "max_tokens": 3,
                                                       "temperature": 0})])):
        with labelled.client(keys[name]) as c:
            for path, body in calls:
                want[name] += completion_tokens(c, path, body)
                requests[name] += 1
    assert want["alpha"] > want["beta"] >= 1
    got = series(labelled)
    task = ("task", "text-generation")
    for name in want:
        labels = tuple(sorted([task, ("tenant", name)]))
        assert got["tailor_generation_tokens_total"][labels] == want[name]
        assert got["tailor_generation_time_to_first_token_seconds_count"][labels] == requests[name]
        # every token after each request's first is one inter-token observation
        assert got["tailor_generation_inter_token_seconds_count"][labels] == want[name] - requests[name]
    for name in METRICS:  # only task and tenant: one series per tenant, nothing else a tenant names
        assert {dict(k)["tenant"] for k in got[name]} == {"alpha", "beta"}
        assert all({k for k, _ in labels} == {"task", "tenant"} for labels in got[name])
