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
"""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from tests.service_fixture import served  # noqa: E402,F401 - the fixture
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
        _, key = new_tenant(admin, "fuzz")
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
