"""What each tenant holds, counted in SQL: the operator's view of the fleet.

``tenant_usage(engine)`` answers, for every tenant (by name), how many adapters and adapter
versions it has and their bytes, its uploaded files and their bytes, its active API keys and
its jobs by status. One grouped query per table, whatever the number of tenants; read on a
read-only connection. Nothing here says anything about one tenant to another: the caller
(the admin route) is the only one that may ask.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from adapters.schema import adapter_versions, adapters, api_keys, files, jobs, read_only, tenants


@dataclass(frozen=True)
class TenantUsage:
    tenant: str
    adapters: int = 0
    versions: int = 0
    adapter_bytes: int = 0
    files: int = 0
    file_bytes: int = 0
    active_keys: int = 0
    jobs: dict[str, int] = field(default_factory=dict)  # by status; statuses without jobs absent


def tenant_usage(engine: Engine) -> list[TenantUsage]:
    """Every tenant's counts, ordered by tenant name."""
    t = tenants.c
    with read_only(engine).connect() as conn:
        names = {tid: name for tid, name in conn.execute(select(t.id, t.name).order_by(t.name))}
        n_adapters = {tid: int(n) for tid, n in conn.execute(
            select(adapters.c.tenant_id, func.count()).group_by(adapters.c.tenant_id))}
        versions = {tid: (int(n), int(b or 0)) for tid, n, b in conn.execute(
            select(adapters.c.tenant_id, func.count(adapter_versions.c.id), func.sum(adapter_versions.c.nbytes))
            .select_from(adapter_versions.join(adapters, adapter_versions.c.adapter_id == adapters.c.id))
            .group_by(adapters.c.tenant_id))}
        uploads = {tid: (int(n), int(b or 0)) for tid, n, b in conn.execute(
            select(files.c.tenant_id, func.count(), func.sum(files.c.bytes)).group_by(files.c.tenant_id))}
        keys = {tid: int(n) for tid, n in conn.execute(
            select(api_keys.c.tenant_id, func.count()).where(api_keys.c.revoked_at.is_(None))
            .group_by(api_keys.c.tenant_id))}
        by_status: dict[int, dict[str, int]] = defaultdict(dict)
        for tid, status, n in conn.execute(select(jobs.c.tenant_id, jobs.c.status, func.count())
                                           .group_by(jobs.c.tenant_id, jobs.c.status)):
            by_status[tid][status] = int(n)
    return [TenantUsage(tenant=name, adapters=int(n_adapters.get(tid, 0)), versions=versions.get(tid, (0, 0))[0],
                        adapter_bytes=versions.get(tid, (0, 0))[1], files=uploads.get(tid, (0, 0))[0],
                        file_bytes=uploads.get(tid, (0, 0))[1], active_keys=int(keys.get(tid, 0)),
                        jobs=dict(sorted(by_status[tid].items())))
            for tid, name in names.items()]
