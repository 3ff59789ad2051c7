"""One source of API shapes and job states: the client's types are generated from the response
models the service publishes, every route has a client method returning what the route declares
and taking what it accepts, a job's statuses are defined once, and the client stays light.

The service's OpenAPI document is built in process (``create_app()`` with no state: no model,
no database).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from adapters import quotas
from adapters.jobs import model
from service import api_typegen, api_types, client, schemas
from service.api_typegen import render
from service.app import create_app
from service.cli import build_parser
from service.client import TailorClient

REPO = Path(__file__).resolve().parents[1]

# The client method for every operation of the API (a new route needs one).
CLIENT_METHODS = {
    "POST /v1/tenants": "create_tenant", "GET /v1/tenants": "list_tenants", "GET /v1/tenants/{name}": "get_tenant",
    "DELETE /v1/tenants/{name}": "delete_tenant", "POST /v1/tenants/{name}/keys": "create_key",
    "GET /v1/tenants/{name}/keys": "list_keys", "DELETE /v1/tenants/{name}/keys/{key_id}": "revoke_key",
    "GET /v1/usage": "tenant_usage",
    "GET /v1/adapters": "list_adapters", "GET /v1/adapters/{name}": "get_adapter",
    "DELETE /v1/adapters/{name}": "delete_adapter", "POST /v1/adapters/{name}/promote": "promote",
    "POST /v1/adapters/{name}/rollback": "rollback", "POST /v1/adapters/{name}/import": "import_adapter",
    "GET /v1/adapters/{name}/export": "export_adapter", "POST /v1/predict": "predict",
    "POST /v1/files": "upload_file", "GET /v1/files": "list_files", "GET /v1/files/{file_id}": "get_file",
    "DELETE /v1/files/{file_id}": "delete_file", "POST /v1/jobs": "create_job", "GET /v1/jobs": "list_jobs",
    "GET /v1/jobs/{job_id}": "get_job", "GET /v1/jobs/{job_id}/events": "job_events",
    "POST /v1/jobs/{job_id}/cancel": "cancel_job",
    "POST /v1/chat/completions": "chat", "POST /v1/completions": "complete", "GET /v1/models": "list_models",
    "GET /v1/models/{model}": "get_model",
}
# where a client method's parameter has another name than the API's (an upload's file)
RENAMED = {"import_adapter": {"file": "source"}, "upload_file": {"file": "path"}}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return create_app().openapi()


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{method.upper()} {path}": op for path, ops in doc["paths"].items() for method, op in ops.items()}


def ref_name(schema: dict[str, Any]) -> str:
    return schema["$ref"].rsplit("/", 1)[1]


def returned(op: dict[str, Any]) -> str:
    """What a client method must return for ``op``: its 2xx JSON answer as a type, or bytes."""
    (answer,) = [r for code, r in op["responses"].items() if code.startswith("2")]
    content = answer["content"]
    if set(content) > {"application/json"}:
        return "bytes"  # a download (the JSON entry is FastAPI's default)
    schema = content["application/json"]["schema"]
    if "$ref" in schema:
        return ref_name(schema)
    if schema.get("type") == "array":
        return f"list[{ref_name(schema['items'])}]"
    assert schema.get("type") == "object" and not schema.get("properties"), schema
    return "dict[str, Any]"  # an answer without a model


def accepted(doc: dict[str, Any], op: dict[str, Any]) -> set[str]:
    """Every parameter ``op`` takes but its path's: query parameters and the fields of its body."""
    names = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
    for content in op.get("requestBody", {}).get("content", {}).values():
        schema = content["schema"]  # a component, or written in place (a body the route reads itself)
        names |= set((doc["components"]["schemas"][ref_name(schema)] if "$ref" in schema else schema)["properties"])
    return names


def test_the_client_types_are_generated_from_the_response_models() -> None:
    assert render() == (REPO / "service" / "api_types.py").read_text(), (
        "service/api_types.py is not what service/schemas.py makes: run python -m service.api_typegen")


def refs(value: Any) -> set[str]:
    """The component names ``value`` (a piece of the OpenAPI document) refers to."""
    if isinstance(value, dict):
        found = {ref_name(value)} if "$ref" in value else set()
        return found.union(*(refs(v) for v in value.values()))
    return set().union(*(refs(v) for v in value)) if isinstance(value, list) else set()


def _all_fields(typed: type) -> list[str]:
    """A TypedDict's fields, its bases' first (the order the JSON answer has them in)."""
    fields: list[str] = []
    for cls in reversed(typed.__mro__):
        fields += [k for k in inspect.get_annotations(cls) if k not in fields]
    return fields


def test_every_shape_the_api_answers_with_is_a_client_type_with_the_same_fields(openapi) -> None:
    components = openapi["components"]["schemas"]
    answers = refs([op["responses"] for op in operations(openapi).values()])
    while (more := refs([components[name] for name in answers]) - answers):  # and what they hold
        answers |= more
    assert {"JobOut", "JobErrorOut", "FileOut", "TenantCreated", "ErrorResponse", "ErrorDetail"} <= answers
    for name in sorted(answers):
        typed = getattr(api_types, name, None)
        assert typed is not None, f"the API answers with {name}; service/api_types.py has no such type"
        assert _all_fields(typed) == list(components[name]["properties"]), name


def test_every_operation_has_a_client_method_returning_its_shape_and_taking_its_parameters(openapi) -> None:
    ops = operations(openapi)
    assert set(ops) == set(CLIENT_METHODS), "a route without a client method, or a method without a route"
    for key, op in ops.items():
        method = getattr(TailorClient, CLIENT_METHODS[key])
        signature = inspect.signature(method)
        assert signature.return_annotation == returned(op), (key, method.__name__)
        renamed = RENAMED.get(method.__name__, {})
        missing = {renamed.get(p, p) for p in accepted(openapi, op)} - set(signature.parameters)
        assert not missing, f"{method.__name__} cannot send {sorted(missing)} ({key} accepts them)"


def test_the_client_knows_every_field_the_old_types_lacked() -> None:
    # drift the hand-written copies had: these reach a client's type checker now
    assert {"duplicates_dropped"} <= set(_all_fields(client.FileInfo))
    assert {"method", "promote", "started_at", "queue_position", "hyperparameters"} <= set(_all_fields(client.Job))
    assert {"source", "job_id", "lora"} <= set(_all_fields(client.AdapterVersion))


def test_job_states_are_defined_once(openapi) -> None:
    assert model.STATUSES == (*model.ACTIVE, *model.FINISHED)
    assert get_args(schemas.JobStatus) == model.STATUSES and get_args(api_types.JobStatus) == model.STATUSES
    assert get_args(api_types.JobMethod) == model.METHODS and get_args(api_types.PromoteMode) == model.PROMOTE_MODES
    assert client.FINISHED is model.FINISHED and quotas.ACTIVE_JOB_STATUSES is model.ACTIVE
    job = openapi["components"]["schemas"]["JobOut"]["properties"]
    assert (job["status"]["enum"], job["method"]["enum"], job["promote"]["enum"]) == (
        list(model.STATUSES), list(model.METHODS), list(model.PROMOTE_MODES))
    (status,) = [p for p in operations(openapi)["GET /v1/jobs"]["parameters"] if p["name"] == "status"]
    assert next(s["enum"] for s in status["schema"]["anyOf"] if "enum" in s) == list(model.STATUSES)
    create = openapi["components"]["schemas"]["JobCreate"]["properties"]
    assert (create["method"]["enum"], create["promote"]["enum"]) == (list(model.METHODS), list(model.PROMOTE_MODES))
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001 - argparse has no API
    choices = {a.dest: tuple(a.choices) for a in train._actions if a.choices}  # noqa: SLF001
    assert (choices["method"], choices["promote"]) == (model.METHODS, model.PROMOTE_MODES)


def test_the_generator_refuses_a_type_it_cannot_write() -> None:
    with pytest.raises(TypeError, match="no JSON type"):
        api_typegen._type(complex, {})  # noqa: SLF001


def test_the_client_and_cli_stay_light() -> None:
    """A client needs httpx, not the model stack or the web framework (a fresh interpreter: this
    one has imported everything already)."""
    code = "import json, sys, service.client, service.cli; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    heavy = {"torch", "transformers", "peft", "bentoml", "fastapi", "starlette", "pydantic", "sqlalchemy", "numpy"}
    assert not loaded & heavy, sorted(loaded & heavy)
    assert "adapters.jobs.model" in json.loads(out.stdout)  # the job states come from their one definition
