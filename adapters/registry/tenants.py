"""Tenants in the registry: create, read, list, delete.

* A tenant name is unique; creating a taken name is ``ConflictError`` (also when another
  process wins the race), ``ensure_tenant`` returns the tenant whoever created it.
* ``delete_tenant`` removes the tenant with everything it owns (adapters, versions, aliases,
  keys, files, jobs: ``ON DELETE CASCADE``) in one transaction, and returns the store keys of
  the deleted versions that no remaining version references; the caller deletes those files
  after the rows are gone. It waits for this tenant's version writers first, so no version
  committed meanwhile is missed (no orphan files from a race).
* Both writes log a change (``tenant_created``, ``tenant_deleted``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.exc import IntegrityError

from adapters.errors import ConflictError, NotFoundError
from adapters.names import validate_name
from adapters.registry.checks import validate_json
from adapters.registry.core import RegistryCore, orphan_keys, tenant_id
from adapters.registry.records import Tenant, tenant_record
from adapters.schema import adapter_versions, adapters, tenants, utcnow


class Tenants(RegistryCore):
    """The tenant part of ``Registry``."""

    def create_tenant(self, name: str, quotas: dict[str, Any] | None = None) -> Tenant:
        validate_name(name, "tenant")
        quotas = validate_json(quotas if quotas is not None else {}, "quotas")
        try:
            return self._write(lambda conn: _create(conn, name, quotas), change=(name, None, "tenant_created"))
        except IntegrityError:  # lost a race with another creator
            raise ConflictError(f"tenant {name!r} already exists", param="tenant") from None

    def get_tenant(self, name: str) -> Tenant:
        validate_name(name, "tenant")
        with self._reader.connect() as conn:
            row = conn.execute(select(tenants).where(tenants.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"tenant {name!r} not found", param="tenant")
        return tenant_record(row)

    def ensure_tenant(self, name: str) -> Tenant:
        validate_name(name, "tenant")
        try:
            return self.get_tenant(name)
        except NotFoundError:
            pass
        try:
            return self.create_tenant(name)
        except ConflictError:  # created concurrently: fine, it exists now
            return self.get_tenant(name)

    def list_tenants(self) -> list[Tenant]:
        with self._reader.connect() as conn:
            rows = conn.execute(select(tenants).order_by(tenants.c.name)).all()
        return [tenant_record(r) for r in rows]

    def delete_tenant(self, name: str) -> list[str]:
        validate_name(name, "tenant")
        return self._write(lambda conn: _delete(conn, name), change=(name, None, "tenant_deleted"))


def _create(conn: Connection, name: str, quotas: dict[str, Any]) -> Tenant:
    if conn.scalar(select(tenants.c.id).where(tenants.c.name == name)) is not None:
        raise ConflictError(f"tenant {name!r} already exists", param="tenant")
    now = utcnow()
    tid = conn.execute(insert(tenants).values(name=name, created_at=now, quotas=quotas)).inserted_primary_key[0]
    return Tenant(id=int(tid), name=name, created_at=now, quotas=dict(quotas))


def _delete(conn: Connection, name: str) -> list[str]:
    tid = tenant_id(conn, name, lock=True)
    # Wait for version writers of this tenant's adapters to finish, so the keys read
    # below include every version the cascade is about to delete (no orphans).
    conn.execute(select(adapters.c.id).where(adapters.c.tenant_id == tid).with_for_update()).all()
    rows = conn.execute(
        select(adapter_versions.c.weights_key, adapter_versions.c.manifest_key)
        .join(adapters, adapters.c.id == adapter_versions.c.adapter_id)
        .where(adapters.c.tenant_id == tid)
    ).all()
    conn.execute(delete(tenants).where(tenants.c.id == tid))  # cascades
    return orphan_keys(conn, (k for r in rows for k in r))
