"""Adapters and their versions in the registry: add, read, list, annotate, delete.

* Version numbers of an adapter are allocated 1, 2, 3, ... atomically, also across threads and
  processes, and are never reused (not even after ``delete_version``): the adapter row keeps
  the highest number ever given out. The first version of a name creates the adapter.
* ``add_version`` enforces the tenant's footprint quotas (``adapters.quotas``: adapters,
  versions per adapter, storage bytes) in its own transaction, with the tenant row locked,
  raising ``QuotaExceededError`` (a ``ConflictError``) before anything is written;
  ``check_quotas`` gives the same answer early, without deciding.
* ``delete_version`` refuses a version an alias points at (``ConflictError``). ``delete_*``
  return the store keys no remaining version references; the caller deletes those files after
  the rows are gone (a crash in between leaves orphan files, never rows pointing at missing
  files).
* Every write logs its change: ``version_added``, ``version_status``, ``metrics_updated``,
  ``version_deleted``, ``adapter_deleted``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from adapters.errors import AdapterNotFoundError, AdapterTaskError, ConflictError, NotFoundError
from adapters.names import validate_name
from adapters.quotas import TenantQuotas, enforce_new_version, lock_tenant
from adapters.registry.checks import check_version_fields, validate_json, validate_refs
from adapters.registry.core import AdapterRow, RegistryCore, orphan_keys, tenant_id
from adapters.registry.records import AdapterInfo, VersionRecord, adapter_infos, version_record
from adapters.schema import adapter_aliases, adapter_versions, adapters, tenants, utcnow
from adapters.tasks import task_of_manifest

DEFAULT_STATUS = "candidate"


class Versions(RegistryCore):
    """The adapter and version part of ``Registry``."""

    def add_version(
        self,
        tenant: str,
        adapter: str,
        *,
        weights_key: str,
        manifest_key: str,
        sha256: str,
        nbytes: int,
        base_fingerprint: str,
        manifest: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        status: str = DEFAULT_STATUS,
    ) -> VersionRecord:
        validate_refs(tenant, adapter, status=status)
        validate_json(manifest, "manifest")
        metrics = validate_json(metrics if metrics is not None else {}, "metrics")
        check_version_fields(weights_key, manifest_key, sha256, nbytes, base_fingerprint)
        new = dict(
            weights_key=weights_key, manifest_key=manifest_key, sha256=sha256, nbytes=nbytes,
            base_fingerprint=base_fingerprint, manifest=manifest, metrics=metrics, status=status,
        )
        return self._write(
            lambda conn: _add(conn, tenant, adapter, new), change=(tenant, adapter, "version_added"),
            rerun_on_clash=True,
        )

    def check_quotas(self, tenant: str, adapter: str, nbytes: int = 0) -> None:
        """Would a new version of ``adapter`` of ``nbytes`` pass the tenant's footprint quotas now?
        A cheap early answer (``QuotaExceededError`` if not) before costly work; ``add_version``
        decides for good, in its own transaction."""
        validate_refs(tenant, adapter)
        with self._reader.connect() as conn:
            row = conn.execute(select(tenants.c.id, tenants.c.quotas).where(tenants.c.name == tenant)).first()
            if row is None:
                raise NotFoundError(f"tenant {tenant!r} not found", param="tenant")
            enforce_new_version(conn, int(row.id), TenantQuotas.stored(row.quotas), adapter, nbytes)

    def get_version(self, tenant: str, adapter: str, version: int) -> VersionRecord:
        validate_refs(tenant, adapter, version=version)
        return self._read_adapter(tenant, adapter, lambda a: a.version(version))

    def list_versions(self, tenant: str, adapter: str) -> list[VersionRecord]:
        validate_refs(tenant, adapter)
        return self._read_adapter(tenant, adapter, _versions)

    def get_adapter(self, tenant: str, adapter: str) -> AdapterInfo:
        validate_refs(tenant, adapter)
        return self._read_adapter(tenant, adapter, lambda a: adapter_infos(a.conn, tenant, [a.row])[0])

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        validate_name(tenant, "tenant")
        with self._reader.connect() as conn:
            tid = tenant_id(conn, tenant)
            rows = conn.execute(
                select(adapters).where(adapters.c.tenant_id == tid).order_by(adapters.c.name)
            ).all()
            return adapter_infos(conn, tenant, list(rows))

    def set_version_status(self, tenant: str, adapter: str, version: int, status: str) -> None:
        validate_refs(tenant, adapter, version=version, status=status)
        self._write_adapter(tenant, adapter, "version_status", lambda a: _set_status(a, version, status))

    def update_metrics(
        self, tenant: str, adapter: str, version: int, metrics: dict[str, Any]
    ) -> VersionRecord:
        """Merge ``metrics`` into the version's metrics (new keys win); return the record."""
        validate_refs(tenant, adapter, version=version)
        validate_json(metrics, "metrics")
        return self._write_adapter(
            tenant, adapter, "metrics_updated", lambda a: _merge_metrics(a, version, metrics)
        )

    def delete_adapter(self, tenant: str, adapter: str) -> list[str]:
        validate_refs(tenant, adapter)
        return self._write_adapter(tenant, adapter, "adapter_deleted", _delete_adapter)

    def delete_version(self, tenant: str, adapter: str, version: int) -> list[str]:
        validate_refs(tenant, adapter, version=version)
        return self._write_adapter(tenant, adapter, "version_deleted", lambda a: _delete_version(a, version))


def _add(conn: Connection, tenant: str, adapter: str, new: dict[str, Any]) -> VersionRecord:
    # The tenant row stays locked to the end: its footprint quotas are counted and the
    # version inserted in one step (concurrent creators of this tenant wait their turn).
    tid, quotas = lock_tenant(conn, tenant)
    enforce_new_version(conn, tid, quotas, adapter, new["nbytes"])
    now = utcnow()
    try:
        aid = AdapterRow.find(conn, tenant, adapter, lock=True).id
        _enforce_task(conn, aid, adapter, new["manifest"])
    except AdapterNotFoundError:
        # A concurrent creator makes this insert fail; the transaction is rerun (a unique
        # clash) and then finds its row.
        aid = conn.execute(
            insert(adapters).values(tenant_id=tid, name=adapter, created_at=now, last_version=0)
        ).inserted_primary_key[0]
    # The counter update takes the row's write lock, so concurrent allocators
    # serialise here and never see the same number.
    conn.execute(update(adapters).where(adapters.c.id == aid).values(last_version=adapters.c.last_version + 1))
    version = int(conn.scalar(select(adapters.c.last_version).where(adapters.c.id == aid)))
    vid = conn.execute(
        insert(adapter_versions).values(adapter_id=aid, version=version, created_at=now, **new)
    ).inserted_primary_key[0]
    return VersionRecord(
        id=int(vid), tenant=tenant, adapter=adapter, version=version, created_at=now,
        **{**new, "manifest": dict(new["manifest"]), "metrics": dict(new["metrics"])},
    )


def _enforce_task(conn: Connection, aid: int, adapter: str, manifest: dict[str, Any]) -> None:
    """Every version of an adapter is of one task kind (the gate compares them, rollback serves
    them on one engine): the newest version's manifest says which."""
    newest = conn.scalar(select(adapter_versions.c.manifest).where(adapter_versions.c.adapter_id == aid)
                         .order_by(adapter_versions.c.version.desc()).limit(1))
    if newest is None:
        return
    have, adding = task_of_manifest(newest), task_of_manifest(manifest)
    if have != adding:
        raise AdapterTaskError(f"adapter {adapter!r} is of task {have}; this version is of task {adding}. An "
                               "adapter's versions all have one task: use another adapter name.", param="adapter")


def _versions(a: AdapterRow) -> list[VersionRecord]:
    rows = a.conn.execute(
        select(adapter_versions).where(adapter_versions.c.adapter_id == a.id).order_by(adapter_versions.c.version)
    ).all()
    return [version_record(a.tenant, a.name, r) for r in rows]


def _set_status(a: AdapterRow, version: int, status: str) -> None:
    a.version(version)  # it must exist
    a.conn.execute(
        update(adapter_versions)
        .where(adapter_versions.c.adapter_id == a.id, adapter_versions.c.version == version)
        .values(status=status)
    )


def _merge_metrics(a: AdapterRow, version: int, metrics: dict[str, Any]) -> VersionRecord:
    record = a.version(version)
    merged = {**record.metrics, **metrics}
    a.conn.execute(update(adapter_versions).where(adapter_versions.c.id == record.id).values(metrics=merged))
    return replace(record, metrics=merged)


def _delete_adapter(a: AdapterRow) -> list[str]:
    rows = a.conn.execute(
        select(adapter_versions.c.weights_key, adapter_versions.c.manifest_key)
        .where(adapter_versions.c.adapter_id == a.id)
    ).all()
    a.conn.execute(delete(adapters).where(adapters.c.id == a.id))  # cascades
    return orphan_keys(a.conn, (k for r in rows for k in r))


def _delete_version(a: AdapterRow, version: int) -> list[str]:
    record = a.version(version)
    pointing = sorted(a.conn.scalars(
        select(adapter_aliases.c.alias)
        .where(adapter_aliases.c.adapter_id == a.id, adapter_aliases.c.version == version)
    ))
    if pointing:
        raise ConflictError(
            f"version {version} of adapter {a.name!r} is in use by alias "
            f"{', '.join(repr(p) for p in pointing)}; move the alias first",
            param="version",
        )
    a.conn.execute(delete(adapter_versions).where(adapter_versions.c.id == record.id))
    return orphan_keys(a.conn, (record.weights_key, record.manifest_key))
