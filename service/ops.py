"""The HTTP side of the routes: plain blocking functions over ``TailorState`` (run in threads).

Every rule of the product lives in the library (``adapters.tenancy``, ``adapters.adapter_import``,
``adapters.adapter_admin``, the registry and the catalog); these functions only call it with
this worker's objects (``caches``: the engine once loaded, the key cache), shape its answers
as the API shows them (``*_out``) and turn what only HTTP knows into library calls and errors
(form fields, request limits, the base model not loaded yet: ``require_engine``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict
from typing import Any

from adapters import adapter_admin, adapter_import, tenancy
from adapters.change_listener import ProcessCaches
from adapters.errors import ArtifactError
from adapters.peft_format import export_peft, zip_files
from adapters.quotas import TenantQuotas
from adapters.registry import AdapterInfo, Tenant, VersionRecord
from adapters.version_status import version_status
from adapters.runtime.engine import ResolvedAdapter
from adapters.runtime.inputs import check_texts
from adapters.runtime.loaded import LoadedAdapter
from service.errors import ApiError
from service.state import TailorState


def caches(state: TailorState) -> ProcessCaches:
    """This worker's engine (once loaded) and key cache: what a write here tells at once."""
    return ProcessCaches(engine=state.engine, key_cache=state.key_cache)


# -- shapes of what the API returns ---------------------------------------------------------------

def tenant_out(t: Tenant) -> dict[str, Any]:
    return {"name": t.name, "created_at": t.created_at,
            "quotas": TenantQuotas.stored(t.quotas).to_dict()}


def key_out(k: Any) -> dict[str, Any]:
    return {"key_id": k.id, "prefix": k.prefix, "created_at": k.created_at, "revoked_at": k.revoked_at,
            "active": k.revoked_at is None}


def version_out(r: VersionRecord, aliases: dict[str, int], ever_prod: Collection[int] = ()) -> dict[str, Any]:
    """A version as the API shows it. ``status`` is ``prod``, ``retired`` (was prod) or
    ``candidate`` (``adapters.version_status``; ``ever_prod``: every version prod has pointed at);
    ``source`` is ``tailor`` for a version a training job made (``job_id`` names the job),
    ``peft`` for an imported one."""
    m = r.manifest
    return {
        "version": r.version, "status": version_status(r.version, aliases.get("prod"), ever_prod),
        "created_at": r.created_at, "metrics": r.metrics,
        "labels": list(m.get("labels") or []), "aliases": sorted(a for a, v in aliases.items() if v == r.version),
        "sha256": r.sha256, "nbytes": r.nbytes, "source": m.get("source"), "job_id": m.get("job_id") or None,
        "lora": m.get("lora"),
    }


def adapter_summary(a: AdapterInfo) -> dict[str, Any]:
    return {"name": a.name, "created_at": a.created_at, "aliases": a.aliases, "versions": a.versions,
            "prod": a.aliases.get("prod")}


def adapter_detail(state: TailorState, tenant: str, name: str) -> dict[str, Any]:
    info = state.registry.get_adapter(tenant, name)
    versions = state.registry.list_versions(tenant, name)
    ever_prod = state.registry.alias_versions(tenant, name, "prod")
    return {"name": info.name, "created_at": info.created_at, "aliases": info.aliases,
            "prod": info.aliases.get("prod"), "versions": [version_out(v, info.aliases, ever_prod) for v in versions]}


# -- tenants ---------------------------------------------------------------------------------------

def create_tenant(state: TailorState, name: str, quotas: dict[str, Any] | None) -> dict[str, Any]:
    new = tenancy.create_tenant(state.registry, state.keys, name, quotas)
    return {**tenant_out(new.tenant), "api_key": new.api_key, "key_id": new.key_id}


def delete_tenant(state: TailorState, name: str) -> dict[str, Any]:
    removed = tenancy.delete_tenant(state.catalog, name, listener=caches(state))
    return {"name": name, "deleted": True, "files_removed": removed}


# -- adapters --------------------------------------------------------------------------------------

def parse_labels(raw: str | None) -> list[str] | None:
    """Form field ``labels``: a JSON list of strings or a comma-separated list."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.startswith("["):
        try:
            labels = json.loads(text)
        except (ValueError, RecursionError):
            raise ApiError(422, "invalid_request", "labels: not a valid JSON list", param="labels") from None
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ApiError(422, "invalid_request", "labels: must be a non-empty list of strings", param="labels")
    else:
        labels = text.split(",")
    return labels  # checked by the library with the dataset rules (import_checks.clean_labels)


def import_adapter(state: TailorState, tenant: str, name: str, data: bytes, labels: list[str] | None,
                   promote: bool | None) -> dict[str, Any]:
    engine = state.require_engine()
    done = adapter_import.import_adapter(state.catalog, engine, tenant, name, data, labels=labels,
                                         promote=promote, listener=caches(state))
    return {"adapter": name, "promoted": done.promoted, **version_out(done.record, done.aliases)}


def export_adapter(state: TailorState, tenant: str, name: str, version: str | None) -> tuple[VersionRecord, bytes]:
    engine = state.require_engine()
    ref: str | None = version.strip() if version else None
    record = state.registry.resolve(tenant, name, ref)
    try:
        artifact = state.catalog.read(record, engine.base.spec)
    except ArtifactError as e:  # stored bytes that no longer fit: a conflict with state, not a bad request
        raise ApiError(409, e.code, f"{name}@{record.version} cannot be exported: {e.message}") from None
    return record, zip_files(export_peft(artifact, engine.base.spec))


def set_alias(state: TailorState, tenant: str, name: str, alias: str, version: int) -> dict[str, Any]:
    return asdict(adapter_admin.set_alias(state.registry, tenant, name, alias, version, listener=caches(state)))


def rollback(state: TailorState, tenant: str, name: str, alias: str) -> dict[str, Any]:
    return asdict(adapter_admin.rollback(state.registry, tenant, name, alias, listener=caches(state)))


def delete_adapter(state: TailorState, tenant: str, name: str) -> dict[str, Any]:
    removed = adapter_admin.delete_adapter(state.catalog, tenant, name, listener=caches(state))
    return {"adapter": name, "deleted": True, "files_removed": removed}


# -- predict ---------------------------------------------------------------------------------------

def acquire(state: TailorState, tenant: str, ref: str) -> tuple[ResolvedAdapter, LoadedAdapter]:
    engine = state.require_engine()
    resolved = engine.resolve(tenant, ref)
    try:
        loaded = engine.acquire(resolved)
    except ArtifactError as e:
        # The stored version cannot be served (corrupt bytes, another base): the tenant's state
        # conflicts with this service; rolling back or re-importing fixes it.
        raise ApiError(409, e.code, f"{resolved.ref} cannot be loaded: {e.message}", param="adapter") from None
    finally:
        state.metrics.sync_cache(engine.cache.stats)
    return resolved, loaded


def acquire_resident(state: TailorState, tenant: str, ref: str) -> tuple[ResolvedAdapter, LoadedAdapter] | None:
    """``acquire`` when memory alone can answer (no I/O: safe on the event loop), else None."""
    engine = state.require_engine()
    hit = engine.resident(tenant, ref)
    if hit is not None:
        state.metrics.sync_cache(engine.cache.stats)
    return hit


def check_inputs(state: TailorState, inputs: list[str]) -> None:
    s = state.settings
    if len(inputs) > s.max_inputs:
        raise ApiError(422, "too_many_inputs", f"{len(inputs)} inputs given; at most {s.max_inputs} per request",
                       param="inputs")
    for i, text in enumerate(inputs):
        if len(text) > s.max_input_chars:
            raise ApiError(422, "input_too_long",
                           f"inputs[{i}] has {len(text)} characters; at most {s.max_input_chars} allowed",
                           param=f"inputs[{i}]")
    check_texts(inputs)  # InvalidInputError (422) naming the first row that is not valid Unicode
