"""The HTTP side of the routes: plain blocking functions over ``TailorState`` (run in threads).

Every rule of the product lives in the library (``adapters.tenancy``, ``adapters.adapter_import``,
``adapters.adapter_admin``, the registry and the catalog); these functions only call it with
this worker's objects (``caches``: the engines once loaded, the key cache), shape its answers
as the API shows them (``*_out``) and turn what only HTTP knows into library calls and errors
(form fields, request limits, the base model not loaded yet: ``require_engine``).

Each task has its own engine (``TailorState.engines``): a request reaches the engine of its
adapter's task. Resolving a name is task-agnostic (any engine's resolver answers it); a
request whose inputs are for another task than its adapter's is a 422 naming the adapter's
task, and an adapter of a task this deployment does not serve a 422 ``task_not_served``.
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
from adapters.runtime.engine import Engine, ResolvedAdapter
from adapters.runtime.loaded import LoadedAdapter
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, TEXT_GENERATION, get_task, task_of_manifest
from adapters.version_status import version_status
from adapters.vision.images import ImageLimits
from service.errors import ApiError
from service.predict_input import PredictRows
from service.state import TailorState


def caches(state: TailorState) -> ProcessCaches:
    """This worker's engines (once loaded) and key cache: what a write here tells at once."""
    return ProcessCaches(engine=state.engine_caches(), key_cache=state.key_cache)


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
        "version": r.version, "task": task_of_manifest(m),
        "status": version_status(r.version, aliases.get("prod"), ever_prod),
        "created_at": r.created_at, "metrics": r.metrics,
        "labels": list(m.get("labels") or []), "aliases": sorted(a for a, v in aliases.items() if v == r.version),
        "sha256": r.sha256, "nbytes": r.nbytes, "source": m.get("source"), "job_id": m.get("job_id") or None,
        "lora": m.get("lora"),
    }


def adapter_summary(state: TailorState, a: AdapterInfo) -> dict[str, Any]:
    return {"name": a.name, "task": state.jobs.adapter_task(a.tenant, a.name), "created_at": a.created_at,
            "aliases": a.aliases, "versions": a.versions, "prod": a.aliases.get("prod")}


def adapter_detail(state: TailorState, tenant: str, name: str) -> dict[str, Any]:
    info = state.registry.get_adapter(tenant, name)
    versions = state.registry.list_versions(tenant, name)
    ever_prod = state.registry.alias_versions(tenant, name, "prod")
    return {"name": info.name, "task": task_of_manifest(versions[-1].manifest) if versions else None,
            "created_at": info.created_at, "aliases": info.aliases, "prod": info.aliases.get("prod"),
            "versions": [version_out(v, info.aliases, ever_prod) for v in versions]}


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
                   promote: bool | None, task: str | None) -> dict[str, Any]:
    served = state.settings.tasks
    task = adapter_import.import_task(
        state.catalog, tenant, name, data, given=task,
        heads={t: engine.base.spec.head_name for t, engine in state.engines.items()},
        default=TEXT_CLASSIFICATION if TEXT_CLASSIFICATION in served else served[0])
    engine = state.require_engine(task, param="task")
    done = adapter_import.import_adapter(state.catalog, engine, tenant, name, data, labels=labels,
                                         promote=promote, listener=caches(state))
    return {"adapter": name, "promoted": done.promoted, **version_out(done.record, done.aliases)}


def export_adapter(state: TailorState, tenant: str, name: str, version: str | None) -> tuple[VersionRecord, bytes]:
    state.any_engine()  # 503 until the bases are loaded
    ref: str | None = version.strip() if version else None
    record = state.registry.resolve(tenant, name, ref)
    engine = state.require_engine(task_of_manifest(record.manifest), param="adapter")
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

def acquire(state: TailorState, tenant: str, rows: PredictRows) -> tuple[ResolvedAdapter, LoadedAdapter]:
    """The adapter ``rows`` name, from the engine of its task: resolved (registry) and loaded
    (store) as needed. A 422 when its task is not the one ``rows`` are for, or is not served."""
    served = rows.task in state.settings.tasks
    engine = state.require_engine(rows.task) if served else state.any_engine()
    resolved = engine.resolve(tenant, rows.adapter)
    try:
        task = task_of_manifest(resolved.record.manifest)
    except ValueError as e:
        raise ApiError(409, "invalid_artifact", f"{resolved.ref} cannot be loaded: {e}", param="adapter") from None
    if task not in state.settings.tasks:
        raise ApiError(422, "task_not_served", f"adapter {rows.adapter!r} is of task {task}; this service does "
                       f"not serve {task} (it serves {', '.join(state.settings.tasks)})", param="adapter")
    if task == TEXT_GENERATION:  # no inputs or images make a generation adapter classify
        raise ApiError(422, "task_mismatch", f"adapter {rows.adapter!r} is of task {task}: call POST "
                       f"/v1/chat/completions or /v1/completions with model={rows.adapter!r}", param="adapter")
    if task != rows.task:
        field = get_task(task).input_field
        raise ApiError(422, "task_mismatch", f"adapter {rows.adapter!r} is of task {task}: send {field}, not "
                       f"{rows.field}", param=rows.field)
    try:
        loaded = engine.acquire(resolved)
    except ArtifactError as e:
        # The stored version cannot be served (corrupt bytes, another base): the tenant's state
        # conflicts with this service; rolling back or re-importing fixes it.
        raise ApiError(409, e.code, f"{resolved.ref} cannot be loaded: {e.message}", param="adapter") from None
    finally:
        state.metrics.sync_cache(task, engine.cache.stats)
    return resolved, loaded


def acquire_resident(state: TailorState, tenant: str,
                     rows: PredictRows) -> tuple[ResolvedAdapter, LoadedAdapter] | None:
    """``acquire`` when memory alone can answer (no I/O: safe on the event loop), else None. An
    engine only holds adapters of its own task, so a hit is of the task ``rows`` are for."""
    engine = state.require_engine(rows.task)
    hit = engine.resident(tenant, rows.adapter)
    if hit is not None:
        state.metrics.sync_cache(rows.task, engine.cache.stats)
    return hit


def check_rows(state: TailorState, rows: PredictRows) -> None:
    """The request limits on ``rows`` that need no decoding: how many, how long a text."""
    s = state.settings
    if rows.task == IMAGE_CLASSIFICATION:
        if len(rows.raw) > s.max_images:
            raise ApiError(422, "too_many_images", f"{len(rows.raw)} images given; at most {s.max_images} per "
                           "request", param="images")
        return
    if len(rows.raw) > s.max_inputs:
        raise ApiError(422, "too_many_inputs", f"{len(rows.raw)} inputs given; at most {s.max_inputs} per request",
                       param="inputs")
    for i, text in enumerate(rows.raw):
        if len(text) > s.max_input_chars:
            raise ApiError(422, "input_too_long",
                           f"inputs[{i}] has {len(text)} characters; at most {s.max_input_chars} allowed",
                           param=f"inputs[{i}]")


def decode_rows(state: TailorState, engine: Engine, rows: PredictRows) -> list[Any]:
    """``rows`` decoded by their task (texts checked; images decoded within the image limits:
    422 naming ``images[i]``, 413 ``image_too_large`` over the byte or pixel limit)."""
    s = state.settings
    limits = ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels) \
        if rows.task == IMAGE_CLASSIFICATION else None
    return engine.decode_rows(rows.raw, limits=limits)
