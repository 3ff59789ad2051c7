"""The web console's HTTP side, without a browser: its files at /ui carry the security headers
(CSP without 'unsafe-*', nosniff, no-referrer, no framing), nothing outside service/console/ is
reachable through it, its sources use no inline script or style and no HTML sinks, and the
admin-only usage counts it shows (GET /v1/usage) are refused to tenants and anonymous callers.
Runs on the session's ``served`` (a real ``bentoml serve``); about 1 s once that is up.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.service_fixture import Served


def test_console_files_carry_strict_security_headers(served: Served) -> None:  # noqa: F811
    with httpx.Client(base_url=served.url, timeout=30) as c:
        r = c.get("/ui")
        assert r.status_code in (307, 308) and r.headers["location"] == "/ui/"
        for path in ("/ui/", "/ui/js/app.js", "/ui/console.css", "/ui/vendor/uplot-1.6.32/uPlot.esm.js", "/ui/nope.js"):
            r = c.get(path)
            assert r.status_code == (404 if path.endswith("nope.js") else 200), path
            csp = r.headers["content-security-policy"]
            directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
            assert directives["default-src"] == "'self'" and directives["script-src"] == "'self'"
            assert directives["style-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
            assert "unsafe" not in csp, csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
        js_type = c.get("/ui/js/app.js").headers["content-type"].split(";")[0]
        assert js_type in ("text/javascript", "application/javascript")  # module scripts need a JS type
        # nothing outside the console folder is served through it
        assert c.get("/ui/%2e%2e/app.py").status_code == 404
        assert c.get("/ui/..%2fconsole_routes.py").status_code == 404
        # the API keeps its JSON 404 for unknown paths
        assert c.get("/uix").json()["error"]["code"] == "not_found"


def test_console_sources_use_no_inline_script_style_or_html_sinks() -> None:
    root = Path(__file__).resolve().parents[1] / "service" / "console"
    html = (root / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert not re.search(r"\sstyle=|\son[a-z]+=", html), "inline style or handler"
    ours = [p for p in (root / "js").rglob("*.js")]
    assert len(ours) >= 8
    for path in ours:
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "setAttribute(\"style", "localStorage", "document.cookie"):
            assert sink not in text, f"{path.name} uses {sink}"


def test_usage_is_the_admins_and_counts_a_new_tenant(served: Served) -> None:  # noqa: F811
    with served.client(served.admin_key) as admin:
        key = admin.post("/v1/tenants", json={"name": "console-usage"}).json()["api_key"]
        mine = [u for u in admin.get("/v1/usage").json() if u["tenant"] == "console-usage"]
        assert mine == [{"tenant": "console-usage", "adapters": 0, "versions": 0, "adapter_bytes": 0, "files": 0,
                         "file_bytes": 0, "active_keys": 1, "jobs": {}}]
        with served.client(key) as tenant:
            r = tenant.get("/v1/usage")
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            data = b"".join(b'{"text": "%s day", "label": "%s"}\n' % (w, label)
                            for w, label in ((b"good", b"pos"), (b"fine", b"pos"), (b"bad", b"neg"), (b"grim", b"neg")))
            assert tenant.post("/v1/files", files={"file": ("tiny.jsonl", data)}).status_code == 201
        mine = [u for u in admin.get("/v1/usage").json() if u["tenant"] == "console-usage"]
        assert mine[0]["files"] == 1 and mine[0]["file_bytes"] > 0
        assert admin.delete("/v1/tenants/console-usage").status_code == 200
    r = httpx.get(f"{served.url}/v1/usage")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
