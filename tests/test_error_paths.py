"""Error paths never crash: whatever a client sends, the answer is a 4xx whose JSON body names
the problem and encodes as UTF-8, never a 500.

Over HTTP against a real ``bentoml serve`` (the session's ``served``), with one tenant that
owns a queued job (no training workers in the fixture, so it stays queued). Bodies are sent as
raw JSON text so that lone UTF-16 surrogates arrive as ``\\ud800`` escapes, as a hostile
client would send them; path and query values arrive as percent-encoded bytes that are not
UTF-8 (``%ED%A0%80`` is a surrogate encoded the way UTF-8 forbids).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from service.errors import body, error_response
from service.schemas import DB_INT_MAX
from tests.test_service_http import new_tenant
from tests.training_data import sentiment

SURROGATE = "\ud800"
SURROGATE_BYTES_IN_URL = "%ED%A0%80"  # "\ud800" as UTF-8 would encode it, were it allowed


def send_json(client: httpx.Client, method: str, path: str, payload: Any) -> httpx.Response:
    """``payload`` as JSON text: lone surrogates become ``\\udXXX`` escapes (valid JSON)."""
    return client.request(method, path, content=json.dumps(payload), headers={"content-type": "application/json"})


def client_error(r: httpx.Response, status: int = 422, code: str | None = None) -> dict[str, Any]:
    """The error of a 4xx answer whose body is strict UTF-8 JSON of the documented shape."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = json.loads(r.content.decode("utf-8"))["error"]  # strict: no lone surrogate got through
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def admin(served):  # noqa: F811
    with served.client(served.admin_key) as c:
        yield c


@pytest.fixture(scope="module")
def tenant(served, admin):  # noqa: F811
    """A tenant's client and the id of one of its queued jobs."""
    _, key = new_tenant(admin, "errs")
    with served.client(key) as c:
        r = c.post("/v1/jobs", json={"adapter": "queued", "training_data": sentiment(12),
                                     "hyperparameters": {"epochs": 1}})
        assert r.status_code == 201, r.text
        yield c, r.json()["id"]


# -- lone surrogates echoed into error bodies ------------------------------------------------------

def test_a_surrogate_hyperparameter_name_is_a_422_naming_it(tenant):
    c, _ = tenant
    r = send_json(c, "POST", "/v1/jobs", {"adapter": "surrogates", "training_data": sentiment(12),
                                          "hyperparameters": {SURROGATE: 1}})
    err = client_error(r, 422, "invalid_hyperparameters")
    assert "\\ud800" in err["message"], err  # named, as an escape the client can read
    assert err.get("param") == "hyperparameters.\\ud800", err


def test_a_surrogate_quota_name_is_a_422_naming_it(admin):
    r = send_json(admin, "POST", "/v1/tenants", {"name": "surrogate-quota", "quotas": {SURROGATE: 1}})
    err = client_error(r, 422, "invalid_quota")
    assert "\\ud800" in err["message"], err
    assert admin.get("/v1/tenants/surrogate-quota").status_code == 404  # and nothing was created


def test_a_surrogate_field_name_is_a_422_that_says_so(tenant):
    c, _ = tenant
    err = client_error(send_json(c, "POST", "/v1/jobs", {"adapter": "a", SURROGATE: 1}), 422, "invalid_request")
    assert "unpaired UTF-16 surrogate" in err["message"], err


def test_a_surrogate_in_a_choice_field_is_a_422_naming_the_field(tenant):
    c, _ = tenant
    err = client_error(send_json(c, "POST", "/v1/jobs", {"adapter": "a", "method": SURROGATE}), 422)
    assert err.get("param") == "method" and "unpaired UTF-16 surrogate" in err["message"], err


def test_invalid_utf8_in_every_path_parameter_is_a_4xx(served, admin, tenant):  # noqa: F811
    """Every route with a path parameter, each parameter given bytes that are not UTF-8."""
    c, job_id = tenant
    paths = admin.get("/openapi.json").json()["paths"]
    templated = [(p, m) for p, ops in paths.items() if "{" in p for m in ops]
    assert len(templated) >= 15, templated
    for path, method in templated:
        url = path
        while "{" in url:
            start, end = url.index("{"), url.index("}")
            url = url[:start] + f"x{SURROGATE_BYTES_IN_URL}y" + url[end + 1:]
        client = admin if path.startswith("/v1/tenants") else c
        r = client.request(method.upper(), url)
        assert 400 <= r.status_code < 500, (method, url, r.status_code, r.text)
        client_error(r, r.status_code)


# -- integers the database cannot hold -------------------------------------------------------------

@pytest.mark.parametrize("after", [DB_INT_MAX + 1, 2**63 - 1, 2**63, 10**40])
def test_an_events_cursor_past_what_the_database_holds_is_a_422(tenant, after):
    c, job_id = tenant
    err = client_error(c.get(f"/v1/jobs/{job_id}/events", params={"after": str(after)}), 422, "invalid_request")
    assert err.get("param") == "after" and str(DB_INT_MAX) in err["message"], err


def test_the_largest_events_cursor_the_database_holds_is_served(tenant):
    c, job_id = tenant
    r = c.get(f"/v1/jobs/{job_id}/events", params={"after": str(DB_INT_MAX)})
    assert r.status_code == 200 and r.json() == [], r.text
    events = c.get(f"/v1/jobs/{job_id}/events", params={"after": "0"}).json()
    assert events and all(e["id"] <= DB_INT_MAX for e in events), events


def test_every_integer_query_parameter_is_bounded(served, admin, tenant):  # noqa: F811
    """Each integer query parameter documents a range within what the database holds, and the
    integers just outside it (and far outside) are 422s naming the parameter."""
    c, job_id = tenant
    paths = admin.get("/openapi.json").json()["paths"]
    found = []
    for path, ops in paths.items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                schema = p.get("schema", {})
                if p["in"] != "query" or schema.get("type") != "integer":
                    continue
                found.append((method, path, p["name"]))
                lo, hi = schema.get("minimum"), schema.get("maximum")
                assert lo is not None and hi is not None and -DB_INT_MAX - 1 <= lo <= hi <= DB_INT_MAX, (path, p)
                url = path.replace("{job_id}", job_id)
                for bad in (lo - 1, hi + 1, 2**63, -(2**63) - 1):
                    r = c.request(method.upper(), url, params={p["name"]: str(bad)})
                    err = client_error(r, 422, "invalid_request")
                    assert err.get("param") == p["name"], (path, bad, err)
    assert {("get", "/v1/jobs/{job_id}/events", "after"), ("get", "/v1/jobs", "limit")} <= set(found), found


# -- the builder itself ---------------------------------------------------------------------------

def test_the_error_builder_renders_whatever_it_is_given():
    response = error_response(422, "invalid_request", f"bad {SURROGATE}", f"x.{SURROGATE}",
                              headers={"Retry-After": "1\r\nX-Injected: 1", "X-Name": "caf\u00e9 \u540d"},
                              details=[{"param": SURROGATE, "message": "m"}], score=float("nan"))
    err = json.loads(response.body.decode("utf-8"))["error"]
    assert err == {"code": "invalid_request", "message": "bad \\ud800", "param": "x.\\ud800",
                   "type": "invalid_request_error",
                   "details": [{"param": "\\ud800", "message": "m"}], "score": "nan"}
    assert response.headers["retry-after"] == "1  X-Injected: 1"  # one header, no line break
    assert "x-injected" not in response.headers
    assert response.headers["x-name"] == "caf\u00e9 \\u540d"
    assert body("c", "plain é 名", "p") == {"error": {"code": "c", "message": "plain é 名", "param": "p"}}
    assert body("c", "m") == {"error": {"code": "c", "message": "m", "param": None}}  # always present


# -- bodies FastAPI cannot parse -------------------------------------------------------------------

@pytest.mark.parametrize("raw, says", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"adapter": "a", "inputs": ["x"], "n": 1' + "0" * 5000 + "}", "too many digits"),
    (b'{"adapter": "a\xff", "inputs": ["x"]}', "not valid UTF-8"),
])
def test_an_unparsable_body_is_a_400_that_says_why(tenant, raw, says):
    c, _ = tenant
    r = c.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    err = client_error(r, 400, "invalid_json")
    assert says in err["message"], err


def test_raw_surrogate_bytes_in_a_body_are_a_422_naming_the_field(tenant):
    c, _ = tenant
    r = c.post("/v1/predict", content=b'{"adapter": "a\xed\xa0\x80", "inputs": ["x"]}',
               headers={"content-type": "application/json"})
    err = client_error(r, 422, "invalid_request")
    assert err.get("param") == "adapter" and "unpaired UTF-16 surrogate" in err["message"], err


def test_an_unknown_job_status_filter_is_a_422_listing_the_statuses(served, admin, tenant):  # noqa: F811
    from adapters.jobs.model import ACTIVE, FINISHED

    c, job_id = tenant
    err = client_error(c.get("/v1/jobs", params={"status": "done"}), 422, "invalid_request")
    assert err.get("param") == "status" and "'queued'" in err["message"], err
    (param,) = [p for p in admin.get("/openapi.json").json()["paths"]["/v1/jobs"]["get"]["parameters"]
                if p["name"] == "status"]
    documented = next(s["enum"] for s in param["schema"]["anyOf"] if "enum" in s)
    assert set(documented) == {*ACTIVE, *FINISHED}  # the library's statuses, no more, no fewer
    assert [j["id"] for j in c.get("/v1/jobs", params={"status": "queued"}).json()] == [job_id]
