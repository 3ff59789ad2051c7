"""Routes: tenants and keys (admin), adapters (tenant), predict (tenant).

Handlers declared ``def`` run in FastAPI's threadpool (database and store work blocks);
``predict`` is ``async`` and sends its blocking parts (registry, store, image decoding) to the
threadpool, then awaits the micro-batcher's future, so the event loop never waits on a
forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adapters import tenancy, usage
from adapters.tasks import TEXT_CLASSIFICATION
from service import ops
from service.auth import Principal, get_state, require_admin, require_tenant
from service.predict_input import OPENAPI_BODY
from service.predict_route import answer_predict
from service.schemas import (
    AdapterDetail, AdapterSummary, AliasChange, ImportedVersion, KeyCreated, KeyOut, PredictResponse,
    PromoteRequest, Task, TenantCreate, TenantCreated, TenantOut, TenantUsage,
)
from service.state import TailorState

State = Annotated[TailorState, Depends(get_state)]
Admin = Annotated[Principal, Depends(require_admin)]
Tenant = Annotated[str, Depends(require_tenant)]

router = APIRouter()


# -- tenants and keys (admin key) ---------------------------------------------------------------

@router.post("/v1/tenants", status_code=201, response_model=TenantCreated, tags=["admin"])
def create_tenant(body: TenantCreate, _: Admin, state: State) -> dict[str, Any]:
    """Create a tenant and its first API key (shown only in this response)."""
    return ops.create_tenant(state, body.name, body.quotas)


@router.get("/v1/tenants", response_model=list[TenantOut], tags=["admin"])
def list_tenants(_: Admin, state: State) -> list[dict[str, Any]]:
    return [ops.tenant_out(t) for t in state.registry.list_tenants()]


@router.get("/v1/tenants/{name}", response_model=TenantOut, tags=["admin"])
def get_tenant(name: str, _: Admin, state: State) -> dict[str, Any]:
    return ops.tenant_out(state.registry.get_tenant(name))


@router.delete("/v1/tenants/{name}", tags=["admin"])
def delete_tenant(name: str, _: Admin, state: State) -> dict[str, Any]:
    """Delete a tenant with its keys, adapters (and their files), uploaded files and jobs."""
    return ops.delete_tenant(state, name)


@router.post("/v1/tenants/{name}/keys", status_code=201, response_model=KeyCreated, tags=["admin"])
def create_key(name: str, _: Admin, state: State) -> dict[str, Any]:
    """A new API key for the tenant (shown only in this response)."""
    key_id, secret = state.keys.create(name)
    return {**ops.key_out(state.keys.get(name, key_id)), "tenant": name, "api_key": secret}


@router.get("/v1/tenants/{name}/keys", response_model=list[KeyOut], tags=["admin"])
def list_keys(name: str, _: Admin, state: State) -> list[dict[str, Any]]:
    return [ops.key_out(k) for k in state.keys.list(name)]


@router.delete("/v1/tenants/{name}/keys/{key_id}", response_model=KeyOut, tags=["admin"])
def revoke_key(name: str, key_id: str, _: Admin, state: State) -> dict[str, Any]:
    """Revoke a key; the next request made with it is refused."""
    return ops.key_out(tenancy.revoke_key(state.keys, name, key_id, listener=ops.caches(state)))


@router.get("/v1/usage", response_model=list[TenantUsage], tags=["admin"])
def tenant_usage(_: Admin, state: State) -> list[dict[str, Any]]:
    """Every tenant's adapters, versions, files, active keys and jobs by status, with their bytes."""
    return [dataclasses.asdict(u) for u in usage.tenant_usage(state.registry.engine)]


# -- adapters (tenant key) --------------------------------------------------------------------------

@router.get("/v1/adapters", response_model=list[AdapterSummary], tags=["adapters"])
def list_adapters(tenant: Tenant, state: State) -> list[dict[str, Any]]:
    return [ops.adapter_summary(state, a) for a in state.registry.list_adapters(tenant)]


@router.get("/v1/adapters/{name}", response_model=AdapterDetail, tags=["adapters"])
def get_adapter(name: str, tenant: Tenant, state: State) -> dict[str, Any]:
    """The adapter's task, versions (metrics, status, labels, aliases) and aliases."""
    return ops.adapter_detail(state, tenant, name)


@router.post("/v1/adapters/{name}/promote", response_model=AliasChange, tags=["adapters"])
def promote(name: str, body: PromoteRequest, tenant: Tenant, state: State) -> dict[str, Any]:
    """Point ``prod`` (or another alias) at a version; predictions follow at once."""
    return ops.set_alias(state, tenant, name, body.alias, body.version)


@router.post("/v1/adapters/{name}/rollback", response_model=AliasChange, tags=["adapters"])
def rollback(name: str, tenant: Tenant, state: State,
             alias: Annotated[str, Query(description="the alias to roll back")] = "prod") -> dict[str, Any]:
    """Point ``prod`` back at the version it had before its latest change."""
    return ops.rollback(state, tenant, name, alias)


@router.delete("/v1/adapters/{name}", tags=["adapters"])
def delete_adapter(name: str, tenant: Tenant, state: State) -> dict[str, Any]:
    return ops.delete_adapter(state, tenant, name)


@router.post("/v1/adapters/{name}/import", status_code=201, response_model=ImportedVersion, tags=["adapters"])
async def import_adapter(
    name: str, tenant: Tenant, state: State,
    file: Annotated[UploadFile, File(description="zip of adapter_config.json + adapter_model.safetensors "
                                                 "[+ tailor_manifest.json]")],
    labels: Annotated[str | None, Form(description="label names: a JSON list or a comma list")] = None,
    promote: Annotated[bool | None, Form(description="make it prod (default: if it has no prod yet)")] = None,
    task: Annotated[Task | None, Form(description=f"the adapter's task (default: what its tailor_manifest.json "
                                                  f"says, else its existing versions' task, else the base whose "
                                                  f"head it saves, else {TEXT_CLASSIFICATION})")] = None,
) -> dict[str, Any]:
    """Import a peft LoRA adapter as the adapter's next version, on the base of its task."""
    data = await file.read()
    return await run_in_threadpool(ops.import_adapter, state, tenant, name, data, ops.parse_labels(labels), promote,
                                   task)


@router.get("/v1/adapters/{name}/export", tags=["adapters"],
            responses={200: {"content": {"application/zip": {}}, "description": "a zip of peft files"}})
def export_adapter(
    name: str, tenant: Tenant, state: State,
    version: Annotated[str | None, Query(description="a version number or alias (default prod)")] = None,
) -> Response:
    """The version as peft files (``PeftModel.from_pretrained`` reads them), zipped."""
    record, data = ops.export_adapter(state, tenant, name, version)
    filename = f"{name}-v{record.version}.zip"
    return Response(data, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "X-Tailor-Version": str(record.version)})


# -- predict (tenant key) -------------------------------------------------------------------------------

@router.post("/v1/predict", response_model=PredictResponse, tags=["predict"], openapi_extra=OPENAPI_BODY)
async def predict(request: Request, tenant: Tenant, state: State) -> JSONResponse:
    """Classify ``inputs`` (texts) or ``images`` with the tenant's adapter of that task; concurrent
    requests of one task share forward passes. JSON, or a multipart form with image files.

    A bad input (422 naming it; 413 for an image over the byte or pixel limit), inputs for
    another task than the adapter's (422 naming its task), an unknown adapter (404) or an
    adapter whose outputs are not finite (409) fails this request only, never another tenant's
    rows in the same batch.
    """
    return await answer_predict(request, tenant, state)
