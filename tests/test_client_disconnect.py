"""A client that goes away before its request body has arrived is answered quietly
(``service.errors``): counted as 499 in ``/metrics``, never a 5xx, and no traceback in the log.
Against a real ``bentoml serve .`` (the session's ``served``), over raw sockets whose bodies
never complete."""

from __future__ import annotations

import re
import socket
import time

import httpx

from tests.service_fixture import Served

_tenants = iter(range(10_000))


def requests_by_status(s: Served, endpoint: str) -> dict[str, float]:
    """``tailor_http_requests_total`` of ``endpoint`` by status, as this instance's /metrics say."""
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "tailor_http_requests_total" and fields.get("endpoint") == endpoint:
            counts[fields["status"]] = counts.get(fields["status"], 0.0) + float(value)
    return counts


def send_half_and_leave(s: Served, path: str, key: str, head_of_body: bytes, declared: int) -> None:
    """POST ``path`` declaring ``declared`` body bytes, send only ``head_of_body``, then close."""
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode() + head_of_body)


def wait_for_status(s: Served, endpoint: str, status: str, want: float, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (counts := requests_by_status(s, endpoint)).get(status, 0.0) < want:
        assert time.monotonic() < deadline, f"{endpoint} never counted {want:g} x {status}: {counts}"
        time.sleep(0.1)
    return counts


def test_a_client_that_leaves_mid_body_is_a_quiet_499(served: Served) -> None:
    with served.client(served.admin_key) as admin:
        r = admin.post("/v1/tenants", json={"name": f"leaver{next(_tenants)}"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    log = served.home / "serve.log"
    log_before = log.stat().st_size
    # predict reads its own body; promote's JSON body is read by FastAPI: both paths
    cases = [("/v1/predict", "/v1/predict", b'{"adapter": "clf", "inputs": ["half a te'),
             ("/v1/adapters/clf/promote", "/v1/adapters/{name}/promote", b'{"version": ')]
    for path, endpoint, head in cases:
        before = requests_by_status(served, endpoint)
        send_half_and_leave(served, path, key, head, declared=len(head) + 500)
        after = wait_for_status(served, endpoint, "499", before.get("499", 0.0) + 1)
        for status in set(before) | set(after):  # nothing else was counted for it: no 5xx, no 400
            if status != "499":
                assert after.get(status, 0.0) == before.get(status, 0.0), (endpoint, before, after)
    # and the service is fine, having logged no traceback for it
    with served.client(key) as c:
        assert c.post("/v1/predict", json={"adapter": "clf", "inputs": ["x"]}).status_code == 404
    with open(log, "rb") as f:
        f.seek(log_before)
        new_log = f.read().decode(errors="replace")
    assert "ClientDisconnect" not in new_log and "Traceback" not in new_log, new_log[-3000:]
