"""Store garbage collection: delete the objects no database row refers to any more.

Every write puts its bytes in the store before the row that refers to them commits, and every
delete removes rows before bytes; a crash or a store outage in between leaves objects that
nothing refers to (never a row without its bytes). A tenant deleted while the store was down
keeps its adapters' weights, its files and its jobs' data in the store. ``collect`` finds and
deletes them.

What counts as referenced: every adapter version's weights and manifest, every uploaded file,
every job's training and validation data, and the shared checkpoint folder of every job that
has not finished. An object is deleted only when all of these hold:

* its key lies under ``tenants/<name>/`` and the database knows ``<name>``: a tenant that
  exists, or one whose deletion is in the change log. A store attached to the wrong (say,
  empty) database is therefore never emptied: the tenants it holds are unknown there.
* no row refers to it, read *after* the store was listed;
* it is older than ``grace_s`` (default 6 h), so a write whose row has not committed yet (it
  commits within seconds of its bytes) is never taken for garbage.

The writers' temp objects a crash left behind (never keys, invisible to readers) go too, once
older than the grace period. Deletes are idempotent, so several workers collecting at once
only repeat each other's work. One store belongs to one database: two deployments must not
share a bucket prefix. A database restored from a backup does not know the versions written since:
collecting then deletes them, which is why workers can be told not to (``--gc-hours 0``,
``TAILOR_STORE_GC_HOURS=0``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine, select, union_all

from adapters import schema
from adapters.jobs import shared_checkpoints
from adapters.jobs.model import ACTIVE
from adapters.store import AdapterStore

log = logging.getLogger("tailor.store_gc")
DEFAULT_GRACE_S = 6 * 3600.0
TENANTS = "tenants/"


@dataclass
class GcReport:
    examined: int = 0  # objects under tenants/
    referenced: int = 0
    young: int = 0  # unreferenced, but within the grace period
    unknown_tenant: int = 0  # under a tenant name the database has never known
    deleted: list[str] = field(default_factory=list)  # (or, in a dry run, would be)
    bytes_freed: int = 0
    temp_removed: int = 0  # writers' temp objects left by a crash (never keys)
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"examined": self.examined, "referenced": self.referenced, "young": self.young,
                "unknown_tenant": self.unknown_tenant, "deleted": len(self.deleted),
                "bytes_freed": self.bytes_freed, "temp_removed": self.temp_removed, "dry_run": self.dry_run,
                "keys": self.deleted}


def _known_tenants(db: Engine) -> set[str]:
    c = schema.changes
    with db.connect() as conn:
        live = set(conn.scalars(select(schema.tenants.c.name)))
        gone = set(conn.scalars(select(c.c.tenant).where(c.c.kind == "tenant_deleted").distinct()))
    return live | gone


def _referenced(db: Engine) -> tuple[set[str], set[str]]:
    """Keys the database refers to, and the checkpoint prefixes of unfinished jobs."""
    v, f, j = schema.adapter_versions, schema.files, schema.jobs
    keys = union_all(select(v.c.weights_key), select(v.c.manifest_key), select(f.c.store_key),
                     select(j.c.training_key), select(j.c.validation_key).where(j.c.validation_key.is_not(None)))
    with db.connect() as conn:
        referenced = set(conn.scalars(keys))
        active = conn.execute(select(j.c.tenant, j.c.id).where(j.c.status.in_(ACTIVE))).all()
    return referenced, {shared_checkpoints.prefix(tenant, job_id) for tenant, job_id in active}


def collect(db: Engine, store: AdapterStore, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
            now: float | None = None) -> GcReport:
    """Delete (or with ``dry_run`` only report) unreferenced objects older than ``grace_s``."""
    if grace_s < 0:
        raise ValueError("grace_s must not be negative")
    report = GcReport(dry_run=dry_run)
    entries = store.entries(TENANTS)  # listed first: a row committed after this still protects
    tenants = _known_tenants(db)
    referenced, live_prefixes = _referenced(db)
    cutoff = (time.time() if now is None else now) - grace_s
    live = tuple(live_prefixes)
    for entry in entries:
        report.examined += 1
        if entry.key in referenced or entry.key.startswith(live):
            report.referenced += 1
        elif entry.key[len(TENANTS):].split("/", 1)[0] not in tenants:
            report.unknown_tenant += 1
        elif entry.modified > cutoff:
            report.young += 1
        else:
            if not dry_run:
                store.delete(entry.key)
            report.deleted.append(entry.key)
            report.bytes_freed += entry.size
    if not dry_run:
        report.temp_removed = store.cleanup_temp(older_than_s=grace_s)
    if report.deleted or report.unknown_tenant:
        log.info("store gc%s: %d of %d objects unreferenced and deleted (%d bytes); %d young, %d under "
                 "tenants this database never knew (left alone)", " (dry run)" if dry_run else "",
                 len(report.deleted), report.examined, report.bytes_freed, report.young, report.unknown_tenant)
    return report
