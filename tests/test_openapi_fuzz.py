"""Schemathesis against the served ``/openapi.json`` (the spec behind ``/docs``): every
operation, with valid and invalid data and a valid tenant key. No request may get a 5xx
(``not_a_server_error``), and every response must match the schema the service documents
(``response_schema_conformance``).

The key belongs to a tenant made for this run, with an adapter, an uploaded file and a queued
job, so that some generated calls reach real objects (their names are mixed into the path
parameters); destructive calls only touch that tenant, and run last. Admin operations get
403 for that key (401 when schemathesis drops the Authorization header on purpose, 400 for
a body FastAPI cannot parse, which it reads before checking the key). A few
examples per operation keep this under a minute on two cores; the examples are derandomized,
so a run is repeatable.

A second pass sends what schemathesis never generates: lone UTF-16 surrogates (as JSON
escapes, and as non-UTF-8 bytes in paths, queries and form fields), other non-ASCII text,
and integers at and past what the database holds (2**31, 2**63, 10**40, negatives). Each of
its requests starts from a generated case made as valid as the tenant's real objects allow,
then breaks exactly one place (a path or query parameter, a body value, a new body key, a
form field), so that the hostile value reaches the code behind the first validation; every
place of the case is tried. Admin operations run with the admin key there, on tenant names
that can never exist (they always hold a non-ASCII character), so nothing real is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from tests.test_service_http import adapter_zip, import_zip, new_tenant  # noqa: E402
from tests.training_data import sentiment  # noqa: E402

EXAMPLES = 5  # per kind of strategy and operation
ADMIN_TAG = "admin"
ADAPTER = "sentiment"  # the name the schema's predict example uses


@pytest.fixture(scope="module")
def fuzz_tenant(served):  # noqa: F811
    """The fuzzing tenant's key, and the ids of its objects by path parameter name."""
    from adapters.base import load_base

    spec = load_base(str(served.model_dir)).spec
    with served.client(served.admin_key) as admin:
        # no 429 for this key: the fuzzer may outrun the default 50 requests/s (it did once the
        # served path got faster), and an admin call must then still answer 403, not 429
        _, key = new_tenant(admin, "fuzz", quotas={"requests_per_second": 1e6})
    with served.client(key) as c:
        assert import_zip(c, ADAPTER, adapter_zip(spec, seed=11, n_labels=2)).status_code == 201
        rows = sentiment(12)
        r = c.post("/v1/files", files={"file": ("rows.jsonl", "\n".join(json.dumps(x) for x in rows).encode())})
        assert r.status_code == 201, r.text
        file_id = r.json()["id"]
        r = c.post("/v1/jobs", json={"adapter": "queued", "training_data": rows, "hyperparameters": {"epochs": 1}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    return key, {"name": ADAPTER, "file_id": file_id, "job_id": job_id}


@pytest.fixture(scope="module")
def api_schema(served):  # noqa: F811
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json")


def strategies_for(schema, operation, known: dict[str, str]) -> list:
    """Generated valid and invalid cases, the schema's own examples, and (tenant operations)
    valid cases whose path parameters name the tenant's real objects."""
    out = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            out.append(operation.as_strategy(generation_mode=mode))
        except Exception:  # noqa: BLE001 - e.g. nothing that can be made invalid
            pass
    out += schema.get_strategies_from_examples(operation)
    names = {p.name for p in operation.path_parameters}
    if names and names <= known.keys() and ADMIN_TAG not in (operation.tags or []):
        out.append(operation.as_strategy(path_parameters={n: known[n] for n in names}))
    return out


def fuzz_operation(schema, operation, url: str, key: str, known: dict[str, str]) -> None:
    strategies = strategies_for(schema, operation, known)
    assert strategies, operation.label
    admin = ADMIN_TAG in (operation.tags or [])

    @given(case=st.one_of(strategies))
    @settings(max_examples=EXAMPLES * len(strategies), deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                          checks=[not_a_server_error, response_schema_conformance])
        sent_key = "Authorization" in response.request.headers
        # 404: the path matched no route (e.g. an encoded '/'); 400: FastAPI could not parse the
        # body, which it reads before the dependencies (the key check) run
        if admin and response.status_code not in (400, 404):
            assert response.status_code == (403 if sent_key else 401), (
                case.method, case.path, response.status_code, response.text)

    run()


# (``schemathesis.pytest.from_fixture`` + ``@schema.parametrize()`` would do this, but its
# lazy loader sets pytest's ``Node._nodeid``, which pytest 9.2 no longer has; so: one subtest
# per operation, by hand.)
def test_no_server_errors_and_responses_match_the_schema(api_schema, fuzz_tenant, served, subtests):  # noqa: F811
    key, known = fuzz_tenant
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/predict", "POST /v1/tenants", "POST /v1/adapters/{name}/import", "POST /v1/jobs",
            "GET /v1/jobs/{job_id}/events", "DELETE /v1/adapters/{name}"} <= labels
    operations.sort(key=lambda op: op.method.upper() == "DELETE")  # deletions last (stable otherwise)
    for operation in operations:
        with subtests.test(operation.label):
            fuzz_operation(api_schema, operation, served.url, key, known)
    with served.client(key) as c:  # and the service is still fine
        assert c.get("/v1/adapters").status_code == 200


# -- hostile values: lone surrogates, other non-ASCII, integers the database cannot hold ------------

HOSTILE_EXAMPLES = 3  # generated cases per operation; each is sent about three times per place
SURROGATE = "\ud800"
SURROGATES = (SURROGATE, "\udfff", "a\udc80b", "\udbff")
HOSTILE_TEXTS = (*SURROGATES, '["\\ud800"]', "\x00", "\u00e9", "\u540d\u524d", "\U0001f642", "\u202e",
                 "\ufeff", "a" * 5000, "../x", "%", "")
PAST_THE_DATABASE = (2**31, 2**63, -(2**63) - 1)  # past a 32-bit column, a 64-bit one, and below
BOUNDARY_INTS = (*PAST_THE_DATABASE, -(2**31) - 1, -1, 0, 2**31 - 1, 2**63 - 1, 2**64, 10**40)

hostile_text = st.one_of(st.sampled_from(HOSTILE_TEXTS),
                         st.text(st.characters(categories=("Cs", "Lo", "So", "Cc", "Mn")), min_size=1, max_size=8))
hostile_int = st.sampled_from(BOUNDARY_INTS)
hostile_scalar = st.one_of(hostile_text, hostile_int)
# a tenant name no tenant can have: every one holds a character outside a-z0-9_-
impossible_name = st.builds(lambda a, b: a + b, hostile_text, st.sampled_from((*SURROGATES, "\u00e9")))


def wire_text(value: Any) -> bytes:
    """``value`` as the bytes a hostile client sends: lone surrogates encoded as UTF-8 forbids."""
    return str(value).encode("utf-8", "surrogatepass")


def in_path(value: Any) -> str:
    return quote(wire_text(value), safe="")


def hostile_values(data, was: Any, label: str) -> list[Any]:
    """What one place gets: where an integer was, the integers past what the database holds
    and a drawn anything (a wrong type must be a 4xx too); elsewhere a lone surrogate, a drawn
    hostile text and a drawn boundary integer."""
    if isinstance(was, int) and not isinstance(was, bool):
        return [*PAST_THE_DATABASE, data.draw(hostile_scalar, label=label)]
    return [SURROGATE, data.draw(hostile_text, label=label), data.draw(hostile_int, label=label)]


def places(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[str, tuple[Any, ...], Any]]:
    """Where a JSON body can be broken: ("leaf", path, value) for each value, ("key", path, None)
    for each object (a new key); lists contribute their first three items."""
    if isinstance(value, dict):
        yield "key", at, None
        for k, v in value.items():
            yield from places(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from places(v, (*at, i))
    elif at:
        yield "leaf", at, value


def broken(value: Any, kind: str, at: tuple[Any, ...], new: Any, key: str = "") -> Any:
    """A copy of ``value`` with the leaf at ``at`` replaced by ``new`` (kind "leaf") or the key
    ``key`` added to the object at ``at`` (kind "key")."""
    if not at:
        return {**value, key: new} if kind == "key" else new
    head, rest = at[0], at[1:]
    if isinstance(value, dict):
        return {**value, head: broken(value[head], kind, rest, new, key)}
    return [broken(v, kind, rest, new, key) if i == head else v for i, v in enumerate(value)]


@pytest.fixture(scope="module")
def hostile_tenant(served):  # noqa: F811
    """Another tenant (its objects are not the first pass's), unthrottled: its key, the values
    that make a case valid (path parameters; body fields by operation) and a valid zip."""
    from adapters.base import load_base

    spec = load_base(str(served.model_dir)).spec
    with served.client(served.admin_key) as admin:
        _, key = new_tenant(admin, "hostile", quotas={"requests_per_second": 1e6})  # never a 429 here
    zip_bytes = adapter_zip(spec, seed=12, n_labels=2)
    with served.client(key) as c:
        assert import_zip(c, ADAPTER, zip_bytes).status_code == 201
        rows = sentiment(12)
        r = c.post("/v1/files", files={"file": ("rows.jsonl", "\n".join(json.dumps(x) for x in rows).encode())})
        assert r.status_code == 201, r.text
        file_id = r.json()["id"]
        r = c.post("/v1/jobs", json={"adapter": "queued", "training_file": file_id, "hyperparameters": {"epochs": 1}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    bodies = {
        "POST /v1/tenants": {"name": "made-by-fuzz", "quotas": {"max_adapters": 5}},
        "POST /v1/jobs": {"adapter": "made-by-fuzz", "training_file": file_id, "training_data": None,
                          "validation_file": None, "validation_data": None, "hyperparameters": {"epochs": 1}},
        "POST /v1/predict": {"adapter": ADAPTER, "inputs": ["great service"]},
        "POST /v1/adapters/{name}/promote": {"version": 1, "alias": "prod"},
        "POST /v1/adapters/{name}/import": {"file": zip_bytes, "labels": "pos,neg"},
    }
    return key, {"name": ADAPTER, "file_id": file_id, "job_id": job_id}, bodies


def hostile_cases(operation, case, data, known: dict[str, str], body: dict[str, Any] | None, admin: bool) -> list:
    """Cases that each break one place of ``case`` with one of ``hostile_values``, the rest made
    valid first where ``known`` (path parameters) and ``body`` (body fields) can, so that the
    hostile value reaches the code behind the first validation."""
    path = dict(case.path_parameters or {})
    query = dict(case.query or {})
    payload = case.body
    if admin:  # never a real tenant: the path names one that cannot exist
        path = {n: in_path(data.draw(impossible_name, label=n)) for n in path}
    else:
        path.update({n: in_path(known[n]) for n in path if n in known})
    if body is not None and isinstance(payload, dict):
        payload = {**payload, **body}
    same = {"media_type": case.media_type, "multipart_content_types": case.multipart_content_types}

    def variant(path_parameters=path, query=query, body=payload):  # noqa: ANN001, ANN202
        return operation.Case(path_parameters=path_parameters, query=query, body=body, **same)

    out = []
    for name in path:
        values = ([data.draw(impossible_name, label=name)] if admin
                  else hostile_values(data, path[name], f"path {name}"))
        out += [variant(path_parameters={**path, name: in_path(v)}) for v in values]
    for p in operation.query:
        integer = (p.definition.get("schema") or {}).get("type") == "integer"
        for v in hostile_values(data, 0 if integer else "", f"query {p.name}"):
            out.append(variant(query={**query, p.name: wire_text(v)}))
    media_type = case.media_type or ""
    if isinstance(payload, (dict, list)) and "json" in media_type:
        for kind, at, was in places(payload):
            if kind == "key":
                keys = [SURROGATE, data.draw(hostile_text, label=f"key {at}")]
                out += [variant(body=broken(payload, kind, at, 1, k)) for k in keys]
            else:
                out += [variant(body=broken(payload, kind, at, v)) for v in hostile_values(data, was, f"{at}")]
    elif isinstance(payload, dict) and "multipart" in media_type:
        for name in payload:
            if name != "file":  # the file stays what it was (a valid zip when made valid)
                out += [variant(body={**payload, name: wire_text(v)}) for v in hostile_values(data, "", name)]
    return out


def test_hostile_values_never_get_a_server_error(api_schema, hostile_tenant, served, subtests):  # noqa: F811
    key, known, bodies = hostile_tenant
    operations = sorted((result.ok() for result in api_schema.get_all_operations()),
                        key=lambda op: op.method.upper() == "DELETE")
    sent: dict[str, int] = {}
    for operation in operations:
        admin = ADMIN_TAG in (operation.tags or [])
        headers = {"Authorization": f"Bearer {served.admin_key if admin else key}"}
        with subtests.test(operation.label):
            @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE), data=st.data())
            @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case, data) -> None:
                for hostile in hostile_cases(operation, case, data, known, bodies.get(operation.label), admin):
                    response = hostile.call_and_validate(base_url=served.url, headers=headers, timeout=30,
                                                         checks=[not_a_server_error, response_schema_conformance])
                    sent[operation.label] = sent.get(operation.label, 0) + 1
                    if response.status_code >= 400:  # the documented error shape, as strict UTF-8 JSON
                        err = json.loads(response.content.decode("utf-8"))["error"]
                        assert isinstance(err["code"], str) and err["message"], err

            run()
    # every operation with a place to break was fuzzed
    breakable = {op.label for op in operations if list(op.path_parameters) or list(op.query) or op.body}
    assert breakable <= sent.keys(), breakable - sent.keys()
    with served.client(key) as c:  # and the service is still fine, the tenant's objects untouched
        assert c.get(f"/v1/adapters/{ADAPTER}").status_code == 200
        assert c.get(f"/v1/jobs/{known['job_id']}").json()["status"] == "queued"
