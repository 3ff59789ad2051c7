"""Publishing and reading adapter artifacts: the store holds bytes, the registry decides.

An artifact is published in two steps: its files are written to the store under a fresh,
never-reused key prefix (atomic per file), then one registry row makes the version exist.
The registry enforces the tenant's quotas (``adapters.quotas``) on that row, so every path
that creates an adapter or a version -- an import, a trained version -- is held to them.
Until that row commits nobody can resolve the version, so a crash between the steps leaves
at most unreferenced files (the store GC, ``adapters.store_gc``, removes them), never a
half-visible adapter. Deleting goes rows first, then bytes, for the same reason.
Reading goes the other way: the registry row gives the key and the sha256, the store verifies
the bytes, and the artifact is decoded and checked against the base model.
"""

from __future__ import annotations

import uuid

from adapters.artifact import MANIFEST_FILE, WEIGHTS_FILE, AdapterArtifact
from adapters.errors import ArtifactError, ChecksumMismatchError
from adapters.fingerprint import BaseSpec
from adapters.names import validate_name
from adapters.registry import Registry, VersionRecord
from adapters.store import AdapterStore

DEFAULT_MAX_ADAPTER_BYTES = 256 << 20


class Catalog:
    def __init__(self, registry: Registry, store: AdapterStore,
                 max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> None:
        self.registry = registry
        self.store = store
        self.max_adapter_bytes = max_adapter_bytes

    def publish(
        self, tenant: str, adapter: str, artifact: AdapterArtifact, *, promote: bool = False,
        status: str = "candidate", spec: BaseSpec | None = None,
    ) -> VersionRecord:
        """Store ``artifact`` as the next version of ``tenant/adapter``; optionally make it prod."""
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        if spec is not None:
            artifact.check_base(spec)
        weights, manifest_bytes, manifest = artifact.encode()
        if len(weights) > self.max_adapter_bytes:
            raise ArtifactError(
                f"adapter weights are {len(weights)} bytes, over the {self.max_adapter_bytes} byte limit"
            )
        # Quotas (adapters, versions, storage): refused here before any byte is written; the
        # registry checks again when it inserts the row, in the same transaction.
        self.registry.check_quotas(tenant, adapter, len(weights))
        prefix = f"{tenant_prefix(tenant)}adapters/{adapter}/{uuid.uuid4().hex}"
        weights_key, manifest_key = f"{prefix}/{WEIGHTS_FILE}", f"{prefix}/{MANIFEST_FILE}"
        sha = self.store.put(weights_key, weights)
        try:
            self.store.put(manifest_key, manifest_bytes)
            record = self.registry.add_version(
                tenant, adapter, weights_key=weights_key, manifest_key=manifest_key, sha256=sha,
                nbytes=len(weights), base_fingerprint=manifest.base_fingerprint,
                manifest=manifest.to_dict(), metrics=manifest.metrics, status=status,
            )
        except BaseException:
            self.store.delete(weights_key)
            self.store.delete(manifest_key)
            raise
        if promote:
            self.registry.set_alias(tenant, adapter, "prod", record.version)
        return record

    def read(self, record: VersionRecord, spec: BaseSpec | None = None) -> AdapterArtifact:
        """Fetch, verify and decode one version; raises ArtifactError subclasses on bad bytes."""
        data = self.store.get(record.weights_key, sha256=record.sha256, max_bytes=self.max_adapter_bytes)
        if record.manifest.get("weights_sha256") != record.sha256:
            raise ChecksumMismatchError(
                f"registry records sha256 {record.sha256} but the manifest says {record.manifest.get('weights_sha256')}"
            )
        artifact = AdapterArtifact.decode(data, record.manifest, max_bytes=self.max_adapter_bytes,
                                          checksum_verified=True)
        if spec is not None:
            artifact.check_base(spec)
        return artifact

    def delete_adapter(self, tenant: str, adapter: str) -> int:
        """Delete the adapter's rows, then the objects no remaining version refers to; returns
        how many objects were removed."""
        return self._delete(self.registry.delete_adapter(tenant, adapter))

    def delete_tenant(self, tenant: str) -> int:
        """Delete the tenant's rows (``Registry.delete_tenant``: one transaction, cascading), then
        its versions' objects, then every object under ``tenant_prefix(tenant)`` (files, jobs'
        data, checkpoints); returns how many objects were removed. ``adapters.tenancy`` is the
        whole deletion (this, and telling the caches)."""
        return self._delete(self.registry.delete_tenant(tenant)) + self.store.delete_prefix(tenant_prefix(tenant))

    def _delete(self, keys: list[str]) -> int:
        for key in keys:
            self.store.delete(key)
        return len(keys)


def tenant_prefix(tenant: str) -> str:
    """Where every store object of ``tenant`` lies."""
    return f"tenants/{validate_name(tenant, 'tenant')}/"
