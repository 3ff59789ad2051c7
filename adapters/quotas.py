"""Per-tenant quotas: stored as JSON on the tenant row, defaults for anything unset.

``TenantQuotas.from_dict`` validates an operator's input (unknown keys and bad values --
booleans, NaN, infinities, negatives, fractions where a count is meant, out-of-range rates --
are errors naming the key); ``stored`` reads a tenant row's quotas back; ``dataset_limits``
turns the quotas into the limits a dataset is checked against at upload and at job submission.

Footprint quotas (``max_adapters``, ``max_versions_per_adapter``, ``max_storage_bytes``) are
enforced by the ``enforce_*`` functions below, always inside the caller's write transaction
with the tenant row locked (``lock_tenant``), so concurrent creators of one tenant count in
turn and can never together pass a limit (PostgreSQL row locks; SQLite serialises writers):

* ``enforce_new_version`` -- ``Registry.add_version``, the one path that creates an adapter or
  a version (an import and the publish of a trained version both go through it): a new adapter
  name counts against ``max_adapters``, together with the names that active jobs have reserved;
  a version against ``max_versions_per_adapter``; its bytes against ``max_storage_bytes``.
* ``enforce_job`` -- ``JobManager.submit``: a job for a new adapter name reserves one of the
  tenant's adapters until it ends; a job for an existing adapter needs room for one more
  version (counting its other active jobs); and the tenant must not be at its storage limit.
* ``enforce_storage`` -- ``Files.upload``: the file's bytes against ``max_storage_bytes``.

Storage is what a tenant keeps: the bytes of its uploaded files plus the weights of every
adapter version it holds. Each refusal is a ``QuotaExceededError`` (a ``ConflictError``: HTTP
409) whose message names the quota and its limit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import Connection, func, select

from adapters import schema
from adapters.datasets import DatasetLimits
from adapters.errors import ConflictError, NotFoundError, TailorError
from adapters.jobs.model import ACTIVE as ACTIVE_JOB_STATUSES  # a job in these may still publish a version
from adapters.strict import is_number, is_whole, known_items

MAX_COUNT = 2**53 - 1  # integers every JSON reader keeps exact
MIN_RATE, MAX_RATE = 0.01, 1e6  # requests_per_second (or 0): a Retry-After of at most 100 s
GiB = 1 << 30


class QuotaError(TailorError, ValueError):
    code = "invalid_quota"


class QuotaExceededError(ConflictError):
    """The tenant's footprint would pass one of its quotas (HTTP 409; the message names it)."""

    code = "quota_exceeded"


class AdapterQuotaError(QuotaExceededError):
    code = "adapter_quota_exceeded"


class VersionQuotaError(QuotaExceededError):
    code = "version_quota_exceeded"


class StorageQuotaError(QuotaExceededError):
    code = "storage_quota_exceeded"


@dataclass(frozen=True)
class TenantQuotas:
    max_adapters: int = 100
    max_versions_per_adapter: int = 100
    max_storage_bytes: int = GiB  # uploaded files + adapter versions
    max_training_rows: int = 50_000
    max_labels: int = 100
    min_examples_per_label: int = 2
    max_concurrent_jobs: int = 1  # running at once
    max_active_jobs: int = 10  # queued + running
    requests_per_second: float = 0.0  # 0 = the service-wide TAILOR_RATE_LIMIT

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TenantQuotas:
        kinds = {f.name: float if f.type in ("float", float) else int for f in fields(cls)}
        values = {key: _check(key, value, kinds[key])
                  for key, value in known_items(d, cls, what="quotas", noun="quota", error=QuotaError)}
        for key in ("max_training_rows", "max_labels", "min_examples_per_label"):
            if values.get(key, 1) < 1:
                raise QuotaError(f"quota {key!r} must be at least 1", param=f"quotas.{key}")
        if values.get("max_labels", 2) < 2:
            raise QuotaError("quota 'max_labels' must be at least 2 (a classifier needs two labels)",
                             param="quotas.max_labels")
        return cls(**values)

    @classmethod
    def stored(cls, d: dict[str, Any] | None) -> TenantQuotas:
        """A tenant row's quotas. Tolerant of what older versions let in: a null (a NaN or an
        infinity was once stored as null) or unknown key means the default."""
        if not isinstance(d, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in d.items() if k in known and v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dataset_limits(self) -> DatasetLimits:
        return DatasetLimits(max_rows=self.max_training_rows, max_labels=self.max_labels,
                             min_examples_per_label=self.min_examples_per_label)


def _check(key: str, value: Any, want: type) -> int | float:
    param = f"quotas.{key}"
    if not is_number(value):
        raise QuotaError(f"quota {key!r} must be a non-negative {want.__name__}, got {_kind(value)}", param=param)
    if isinstance(value, float) and not math.isfinite(value):
        raise QuotaError(f"quota {key!r} must be a finite number, got {value!r}", param=param)
    if value < 0:
        raise QuotaError(f"quota {key!r} must be a non-negative {want.__name__}, got {value!r}", param=param)
    if want is int:
        if not is_whole(value):
            raise QuotaError(f"quota {key!r} must be a whole number, got {value!r}", param=param)
        if value > MAX_COUNT:
            raise QuotaError(f"quota {key!r} must be at most {MAX_COUNT}", param=param)
        return int(value)
    if key == "requests_per_second" and value != 0 and not MIN_RATE <= value <= MAX_RATE:
        raise QuotaError(f"quota 'requests_per_second' must be 0 (the service's default rate) or between {MIN_RATE:g} and "
                         f"{MAX_RATE:g}, got {value!r}", param=param)
    return float(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


# -- enforcement, inside the caller's write transaction ---------------------------------------------

T, A, V, F, J = schema.tenants, schema.adapters, schema.adapter_versions, schema.files, schema.jobs


def lock_tenant(conn: Connection, tenant: str) -> tuple[int, TenantQuotas]:
    """Lock the tenant row (PostgreSQL ``FOR NO KEY UPDATE``: footprint checks of one tenant run
    in turn; plain inserts that only reference the tenant are not blocked) and read its quotas."""
    row = conn.execute(
        select(T.c.id, T.c.quotas).where(T.c.name == tenant).with_for_update(key_share=True)
    ).first()
    if row is None:
        raise NotFoundError(f"tenant {tenant!r} not found", param="tenant")
    return int(row.id), TenantQuotas.stored(row.quotas)


def storage_used(conn: Connection, tenant_id: int) -> tuple[int, int]:
    """(bytes of uploaded files, bytes of adapter versions) the tenant holds."""
    files = conn.scalar(select(func.coalesce(func.sum(F.c.bytes), 0)).where(F.c.tenant_id == tenant_id))
    versions = conn.scalar(
        select(func.coalesce(func.sum(V.c.nbytes), 0)).select_from(V.join(A, A.c.id == V.c.adapter_id))
        .where(A.c.tenant_id == tenant_id)
    )
    return int(files or 0), int(versions or 0)


def enforce_storage(conn: Connection, tenant_id: int, quotas: TenantQuotas, adding: int, *,
                    what: str, param: str | None = None) -> None:
    """Refuse ``adding`` more bytes when they would take the tenant past ``max_storage_bytes``."""
    files, versions = storage_used(conn, tenant_id)
    used, limit = files + versions, quotas.max_storage_bytes
    if used + adding > limit:
        raise StorageQuotaError(
            f"storage quota exceeded: {what} ({adding:,} bytes) would bring this tenant to "
            f"{used + adding:,} bytes; its limit (max_storage_bytes) is {limit:,} bytes "
            f"(in use: {files:,} in uploaded files, {versions:,} in adapter versions). "
            "Delete files, versions or adapters, or ask for a larger quota.", param=param)


def _reserved_names(conn: Connection, tenant_id: int, existing: set[str]) -> set[str]:
    """Adapter names that active jobs will create: each holds one of the tenant's adapters."""
    names = conn.scalars(
        select(J.c.adapter).where(J.c.tenant_id == tenant_id, J.c.status.in_(ACTIVE_JOB_STATUSES)).distinct()
    )
    return set(names) - existing


def _enforce_new_adapter(conn: Connection, tenant_id: int, quotas: TenantQuotas, adapter: str) -> None:
    existing = set(conn.scalars(select(A.c.name).where(A.c.tenant_id == tenant_id)))
    if adapter in existing:
        return
    reserved = _reserved_names(conn, tenant_id, existing) - {adapter}
    taken, limit = len(existing) + len(reserved), quotas.max_adapters
    if taken >= limit:
        held = f" ({len(reserved)} of them reserved by active jobs for new adapters)" if reserved else ""
        raise AdapterQuotaError(
            f"adapter quota exceeded: this tenant has {taken} adapters{held}; its limit (max_adapters) "
            f"is {limit}. Delete an adapter or ask for a larger quota.", param="adapter")


def _version_count(conn: Connection, tenant_id: int, adapter: str) -> int:
    return int(conn.scalar(
        select(func.count()).select_from(V.join(A, A.c.id == V.c.adapter_id))
        .where(A.c.tenant_id == tenant_id, A.c.name == adapter)
    ) or 0)


def _version_refusal(adapter: str, count: int, pending: int, limit: int) -> VersionQuotaError:
    more = f" and {pending} active job{'s' if pending != 1 else ''} about to add more" if pending else ""
    return VersionQuotaError(
        f"version quota exceeded: adapter {adapter!r} has {count} versions{more}; its limit "
        f"(max_versions_per_adapter) is {limit}. Delete old versions (or the adapter) or ask for a "
        "larger quota.", param="adapter")


def enforce_new_version(conn: Connection, tenant_id: int, quotas: TenantQuotas, adapter: str,
                        nbytes: int) -> None:
    """Before a version of ``adapter`` (and, the first time, the adapter itself) is inserted."""
    _enforce_new_adapter(conn, tenant_id, quotas, adapter)
    count = _version_count(conn, tenant_id, adapter)
    if count >= quotas.max_versions_per_adapter:
        raise _version_refusal(adapter, count, 0, quotas.max_versions_per_adapter)
    enforce_storage(conn, tenant_id, quotas, nbytes, what=f"a new version of {adapter!r}", param="adapter")


def enforce_job(conn: Connection, tenant_id: int, quotas: TenantQuotas, adapter: str) -> None:
    """Before a job that will publish a version of ``adapter`` is inserted (its size is not known
    yet: only a tenant already at its storage limit is refused here; the publish checks again)."""
    _enforce_new_adapter(conn, tenant_id, quotas, adapter)
    count = _version_count(conn, tenant_id, adapter)
    pending = int(conn.scalar(
        select(func.count()).select_from(J)
        .where(J.c.tenant_id == tenant_id, J.c.adapter == adapter, J.c.status.in_(ACTIVE_JOB_STATUSES))
    ) or 0)
    if count + pending >= quotas.max_versions_per_adapter:
        raise _version_refusal(adapter, count, pending, quotas.max_versions_per_adapter)
    files, versions = storage_used(conn, tenant_id)
    if files + versions >= quotas.max_storage_bytes:
        raise StorageQuotaError(
            f"storage quota exceeded: this tenant holds {files + versions:,} bytes ({files:,} in "
            f"uploaded files, {versions:,} in adapter versions); its limit (max_storage_bytes) is "
            f"{quotas.max_storage_bytes:,} bytes, so a trained version could not be kept. Delete "
            "files, versions or adapters, or ask for a larger quota.", param="adapter")
