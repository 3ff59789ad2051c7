"""What a served process logs: no line per request unless asked, and a readable start line.

BentoML's access log wrote one INFO line per request (a flood under load); it is off by
default and ``TAILOR_ACCESS_LOG=1`` turns it on. The start line said "base model model loaded"
(the base's folder is called ``model``). Real ``bentoml serve`` processes, the session's: ``served``
(default logging) and ``served_text_only`` (``TAILOR_ACCESS_LOG=1``), each log read while it runs.
"""

from __future__ import annotations

import uuid

from tests.service_fixture import ADMIN_KEY, IMAGE_BASE_SEED, Served

REQUESTS = 6


def access_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "method=GET,path=/v1/tenants" in line]


def test_no_line_per_request_by_default_and_a_readable_start(served: Served) -> None:
    """On the session's server (default logging), read while it runs: an access line is written
    right after its response is sent, before the worker (one; its requests are answered in turn)
    answers the next request, so once the request after ours is answered any line of ours is in."""
    with served.client(ADMIN_KEY) as c:
        for _ in range(REQUESTS):
            assert c.get("/v1/tenants").status_code == 200
        assert c.get("/readyz").status_code == 200
    log = (served.home / "serve.log").read_text(errors="replace")
    assert access_lines(log) == []
    assert "loaded text-classification base model 'model' on " in log and "base model model" not in log
    assert f"loaded image-classification base model 'tiny-efficientnet-{IMAGE_BASE_SEED}' on " in log
    assert "ready: serving text-classification, image-classification" in log


def test_access_log_when_asked(served_text_only: Served) -> None:
    """``TAILOR_ACCESS_LOG=1`` (the session's text-only server has it on): a line per request,
    counted on a path no other request takes, once the request after them is answered."""
    s = served_text_only
    path = f"/v1/tenants/logged-{uuid.uuid4().hex[:12]}"
    with s.client(ADMIN_KEY) as c:
        for _ in range(REQUESTS):
            assert c.get(path).status_code == 404
        assert c.get("/readyz").status_code == 200
    log = (s.home / "serve.log").read_text(errors="replace")
    assert len([line for line in log.splitlines() if f"method=GET,path={path}" in line]) == REQUESTS, log[-3000:]
