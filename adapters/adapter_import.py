"""Importing a zipped peft adapter as the next version of a tenant's adapter.

``import_adapter`` is the one import path (HTTP, a command-line tool or a console all call it);
each step refuses before the next, costlier one runs, and nothing is stored unless all pass:

1. the adapter name (``InvalidNameError``), then the tenant's footprint quotas
   (``Registry.check_quotas``: adapters, versions, storage; an early answer, the registry decides
   for good when it inserts the version, in one transaction), then a non-empty upload;
2. the zip (``unzip_files``: flat, few members, inflated size bounded by the catalog's adapter
   size limit plus ``ZIP_OVERHEAD``);
3. the base: a Tailor export names the base it was trained on and is refused for any other
   (``check_manifest_base``: ``FingerprintMismatchError``); a plain peft adapter carries no
   fingerprint and is held to the base's shapes by ``import_peft``;
4. the bar training sets (``adapters.import_checks``): label names by the dataset rules under
   the tenant's own dataset limits, LoRA targets against the base (``import_peft``), finite
   logits through the engine's real forward pass (``probe_logits``);
5. one task per adapter: an adapter whose versions (or active job) are of another task than
   ``engine``'s refuses the import (``AdapterTaskError``, 409; the registry checks it again when
   it inserts the version);
6. ``Catalog.publish`` as the next version; it becomes ``prod`` when ``promote`` says so, and
   when ``promote`` is None exactly when the adapter had no ``prod`` before this import;
7. the listener is told (``ChangeListener.adapter_changed``) so this process serves it at once.

``import_task`` says which task (so which engine) an upload is for, before any of this runs.

Every refusal is a library error (``ArtifactError`` and its subclasses: HTTP 422;
``QuotaExceededError`` and ``AdapterTaskError``: 409; ``NotFoundError`` for an unknown tenant: 404).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


from adapters.artifact import AdapterManifest
from adapters.catalog import Catalog
from adapters.change_listener import NO_LISTENER, ChangeListener
from adapters.errors import AdapterTaskError, ArtifactError, FingerprintMismatchError, InvalidTaskError, NotFoundError
from adapters.import_checks import probe_logits
from adapters.names import validate_name
from adapters.jobs.adapter_tasks import held_task
from adapters.peft_format import CONFIG_FILE, TAILOR_FILE, import_peft, unzip_files
from adapters.quotas import TenantQuotas
from adapters.registry import VersionRecord
from adapters.tasks import HEADLESS_TASKS, canonical_task, get_task

if TYPE_CHECKING:
    from adapters.runtime.engine import Engine

ZIP_OVERHEAD = 4 << 20  # config + manifest next to the weights


@dataclass(frozen=True)
class ImportedVersion:
    record: VersionRecord
    promoted: bool
    aliases: dict[str, int]  # the adapter's aliases right after the import


def check_manifest_base(files: dict[str, bytes], fingerprint: str) -> None:
    """A Tailor export names the base it was trained on: refuse it for any other base.

    (A plain peft adapter carries no fingerprint; ``import_peft`` still checks its shapes.)
    """
    raw = files.get(TAILOR_FILE)
    if raw is None:
        return
    try:
        manifest = AdapterManifest.from_json(raw)
    except ArtifactError as e:
        raise ArtifactError(f"{TAILOR_FILE}: {e.message}") from None
    if manifest.base_fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"base model mismatch: this adapter was trained on base {manifest.base_fingerprint[:23]}..., "
            f"but this service runs base {fingerprint[:23]}...; adapters only work on the base they were "
            "trained on", param="file")


def import_adapter(catalog: Catalog, engine: Engine, tenant: str, name: str, data: bytes, *,
                   labels: Sequence[str] | None = None, promote: bool | None = None,
                   listener: ChangeListener = NO_LISTENER) -> ImportedVersion:
    """Import the zipped peft files ``data`` as the next version of ``tenant``'s adapter ``name``
    on ``engine``'s base (see the module docstring for the checks and their order)."""
    registry = catalog.registry
    validate_name(name, "adapter")
    spec = engine.base.spec
    registry.check_quotas(tenant, name)
    try:
        existing = registry.get_adapter(tenant, name)
    except NotFoundError:
        existing = None
    if not data:
        raise ArtifactError("the uploaded file is empty", param="file")
    files = unzip_files(data, max_bytes=catalog.max_adapter_bytes + ZIP_OVERHEAD)
    check_manifest_base(files, spec.fingerprint)
    held = current_task(catalog, tenant, name)
    if held is not None and held[0] != spec.task:
        raise AdapterTaskError(f"adapter {name!r} is of task {held[0]} ({held[1]}); this upload is of task "
                               f"{spec.task}. An adapter's versions all have one task: import it under another "
                               "name.", param="task")
    quotas = TenantQuotas.stored(registry.get_tenant(tenant).quotas)
    artifact = import_peft(files, spec, labels=list(labels) if labels is not None else None,
                           limits=quotas.dataset_limits())
    probe_logits(engine, artifact)
    if promote is None:
        promote = existing is None or "prod" not in existing.aliases
    record = catalog.publish(tenant, name, artifact, promote=promote, spec=spec)
    listener.adapter_changed(tenant, name)
    return ImportedVersion(record=record, promoted=promote, aliases=registry.get_aliases(tenant, name))


def current_task(catalog: Catalog, tenant: str, name: str) -> tuple[str, str] | None:
    """The task ``tenant``'s adapter ``name`` holds (its versions', else an active job's) and
    where that was read; None for a free name (or an unknown tenant: the import says so)."""
    return held_task(catalog.registry.engine, tenant, name)


def import_task(catalog: Catalog, tenant: str, name: str, data: bytes, *, given: str | None,
                heads: Mapping[str, str], default: str) -> str:
    """The task (so the engine) an upload is for, the first of: ``given`` (a ``task`` field;
    ``InvalidTaskError`` for an unknown one); the task the zip's ``tailor_manifest.json`` names (a
    Tailor export); the task the adapter holds already; the task whose base's classification head
    (``heads``: task -> module name, e.g. ``classifier`` / ``_fc``) the peft config lists in
    ``modules_to_save``; the head-less task among ``heads`` whose peft ``task_type`` the config
    names (``CAUSAL_LM``: text generation); ``default``. A zip that cannot be read gives ``default``: the import
    itself then says what is wrong with it."""
    if given is not None and given.strip():
        try:
            return canonical_task(given.strip())
        except ValueError as e:
            raise InvalidTaskError(f"task: {e}", param="task") from None
    try:
        files = unzip_files(data, max_bytes=catalog.max_adapter_bytes + ZIP_OVERHEAD,
                            only=(TAILOR_FILE, CONFIG_FILE)) if data else {}  # not the weights
    except ArtifactError:
        files = {}
    manifest_task = _json_field(files.get(TAILOR_FILE), "task")
    if manifest_task is not None:
        try:
            return canonical_task(manifest_task)
        except ValueError:
            pass  # the import refuses the manifest, naming the problem
    held = current_task(catalog, tenant, name)
    if held is not None:
        return held[0]
    saved = _json_field(files.get(CONFIG_FILE), "modules_to_save")
    for task, head in heads.items():
        if isinstance(saved, list) and head in saved:
            return task
    peft_type = _json_field(files.get(CONFIG_FILE), "task_type")
    for task in heads:  # a head-less task peft names by its task_type (CAUSAL_LM: text generation)
        if task in HEADLESS_TASKS and peft_type is not None and peft_type == get_task(task).peft_task_type:
            return task
    return default


def _json_field(raw: bytes | None, key: str) -> Any:
    """``key`` of the JSON object ``raw`` holds; None when absent or unreadable."""
    try:
        data = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return None
    return data.get(key) if isinstance(data, dict) else None
