"""What the registry hands back: frozen records, detached from the database, and their row mapping.

Every record is a frozen dataclass built from plain values (JSON columns copied into fresh
dicts), so a caller may keep it, share it across threads and compare it; no record holds a
connection or lazily loads anything. Times are aware UTC datetimes (``adapters.schema.tables``).
A record always names its tenant and adapter by the names the caller looked it up with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select

from adapters.schema import adapter_aliases, adapter_versions


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created_at: datetime
    quotas: dict[str, Any]


@dataclass(frozen=True)
class AdapterInfo:
    id: int
    tenant: str
    name: str
    created_at: datetime
    aliases: dict[str, int]
    versions: list[int]


@dataclass(frozen=True)
class VersionRecord:
    id: int
    tenant: str
    adapter: str
    version: int
    weights_key: str
    manifest_key: str
    sha256: str
    nbytes: int
    base_fingerprint: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    status: str
    created_at: datetime


@dataclass(frozen=True)
class Change:
    seq: int
    tenant: str
    adapter: str | None
    kind: str
    at: datetime


def tenant_record(row: Row[Any]) -> Tenant:
    m = row._mapping
    return Tenant(id=m["id"], name=m["name"], created_at=m["created_at"], quotas=dict(m["quotas"] or {}))


def version_record(tenant: str, adapter: str, row: Row[Any]) -> VersionRecord:
    m = row._mapping
    return VersionRecord(
        id=m["id"],
        tenant=tenant,
        adapter=adapter,
        version=m["version"],
        weights_key=m["weights_key"],
        manifest_key=m["manifest_key"],
        sha256=m["sha256"],
        nbytes=m["nbytes"],
        base_fingerprint=m["base_fingerprint"],
        manifest=dict(m["manifest"] or {}),
        metrics=dict(m["metrics"] or {}),
        status=m["status"],
        created_at=m["created_at"],
    )


def change_record(row: Row[Any]) -> Change:
    return Change(seq=row.seq, tenant=row.tenant, adapter=row.adapter, kind=row.kind, at=row.at)


def adapter_infos(conn: Connection, tenant: str, rows: list[Row[Any]]) -> list[AdapterInfo]:
    """``AdapterInfo`` of each adapter row (two queries for all of them, not two per adapter)."""
    ids = [r.id for r in rows]
    versions: dict[int, list[int]] = {i: [] for i in ids}
    aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
    if ids:
        for aid, v in conn.execute(
            select(adapter_versions.c.adapter_id, adapter_versions.c.version)
            .where(adapter_versions.c.adapter_id.in_(ids))
            .order_by(adapter_versions.c.version)
        ):
            versions[aid].append(v)
        for aid, alias, v in conn.execute(
            select(adapter_aliases.c.adapter_id, adapter_aliases.c.alias, adapter_aliases.c.version)
            .where(adapter_aliases.c.adapter_id.in_(ids))
            .order_by(adapter_aliases.c.alias)
        ):
            aliases[aid][alias] = v
    return [
        AdapterInfo(
            id=r.id,
            tenant=tenant,
            name=r.name,
            created_at=r.created_at,
            aliases=aliases[r.id],
            versions=versions[r.id],
        )
        for r in rows
    ]
