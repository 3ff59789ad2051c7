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
5. ``Catalog.publish`` as the next version; it becomes ``prod`` when ``promote`` says so, and
   when ``promote`` is None exactly when the adapter had no ``prod`` before this import;
6. the listener is told (``ChangeListener.adapter_changed``) so this process serves it at once.

Every refusal is a library error (``ArtifactError`` and its subclasses: HTTP 422;
``QuotaExceededError``: 409; ``NotFoundError`` for an unknown tenant: 404).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters.artifact import AdapterManifest
from adapters.catalog import Catalog
from adapters.change_listener import NO_LISTENER, ChangeListener
from adapters.errors import ArtifactError, FingerprintMismatchError, NotFoundError
from adapters.import_checks import probe_logits
from adapters.names import validate_name
from adapters.peft_format import TAILOR_FILE, import_peft, unzip_files
from adapters.quotas import TenantQuotas
from adapters.registry import VersionRecord

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
    quotas = TenantQuotas.stored(registry.get_tenant(tenant).quotas)
    artifact = import_peft(files, spec, labels=list(labels) if labels is not None else None,
                           limits=quotas.dataset_limits())
    probe_logits(engine, artifact)
    if promote is None:
        promote = existing is None or "prod" not in existing.aliases
    record = catalog.publish(tenant, name, artifact, promote=promote, spec=spec)
    listener.adapter_changed(tenant, name)
    return ImportedVersion(record=record, promoted=promote, aliases=registry.get_aliases(tenant, name))
