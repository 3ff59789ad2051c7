"""Registry of tenants, adapters, versions and aliases, kept in SQL (SQLAlchemy Core).

The same code runs on ``sqlite:///path.db`` and ``postgresql://...``; tables live in
``adapters.schema``. Contract a caller may rely on:

* Every tenant/adapter/alias argument is checked with ``validate_name`` and every version
  must be an int in ``1..2**31-1``, before any query runs (``InvalidNameError`` otherwise).
* Every write is one transaction; a failed call leaves no partial rows.
* Version numbers of an adapter are allocated 1, 2, 3, ... atomically, also across threads
  and processes, and are never reused (not even after ``delete_version``).
* ``resolve`` returns exactly the version asked for or raises ``AdapterNotFoundError``; it
  never falls back. A missing adapter, another tenant's adapter and a missing version or
  alias all raise that error, and its message names only the caller's own adapter, version
  or alias, so tenants cannot probe each other.
* ``delete_*`` return the store keys no remaining version references; the caller deletes
  those files after the rows are gone (a crash in between leaves orphan files, never rows
  pointing at missing files).
* ``add_version`` enforces the tenant's footprint quotas (``adapters.quotas``: adapters,
  versions per adapter, storage bytes) in its own transaction, raising ``QuotaExceededError``
  (a ``ConflictError``) before anything is written.
* Every mutation appends to the ``changes`` log; other processes poll ``change_seq`` and
  read ``changes_since`` to notice promotions and deletions. Sequence numbers become visible
  in order on both backends: once ``change_seq()`` returns n, every change up to n can be read
  (a poller never skips a change that commits late).
* The same guarantees hold on PostgreSQL under concurrent writers (row locks on the adapter or
  tenant being changed, unique constraints, reruns on unique clashes, serialization failures
  and deadlocks). A database that cannot be reached raises ``DatabaseUnavailableError``.
* Returned records are frozen dataclasses, detached from the database, with aware UTC times.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Row, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from adapters.errors import AdapterNotFoundError, ConflictError, InvalidNameError, NotFoundError
from adapters.names import validate_key, validate_name
from adapters.quotas import TenantQuotas, enforce_new_version, lock_tenant
from adapters.schema import (
    adapter_aliases,
    adapter_versions,
    adapters,
    alias_history,
    changes,
    configure_engine,
    create_schema,
    lock_change_log,
    make_engine,
    read_only,
    tenants,
    utcnow,
)

DEFAULT_ALIAS = "prod"
DEFAULT_STATUS = "candidate"
MAX_VERSION = 2**31 - 1
MAX_CHANGES_PAGE = 10_000
_WRITE_RETRIES = 5
_DIGITS = re.compile(r"[0-9]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# PostgreSQL aborts one of two transactions with these; rerunning it is always safe.
_RERUN_SQLSTATES = ("40001", "40P01")  # serialization_failure, deadlock_detected
MAX_FINGERPRINT_LENGTH = 128

T = TypeVar("T")


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


def validate_version(value: object) -> int:
    """Return ``value`` if it is a version number (int in 1..2**31-1), else raise."""
    # bool is an int subclass; True must not mean version 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise InvalidNameError(
            f"invalid version {value!r}: use a positive integer", param="version"
        )
    return value


def _validate_alias(alias: object) -> str:
    validate_name(alias, "alias")
    assert isinstance(alias, str)
    # resolve() reads an all-digit ref as a version number, so such an alias could never
    # be reached by name.
    if _DIGITS.fullmatch(alias):
        raise InvalidNameError(
            f"invalid alias {alias!r}: an alias must not be a number", param="alias"
        )
    return alias


def _validate_json(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return value


class Registry:
    """Tenants, adapters, versions and aliases in one SQL database."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Open ``url``; ``migrate=False`` connects lazily and leaves ``create_schema`` to the caller
        (the service does, retrying while the database is unreachable)."""
        self._init(make_engine(url), migrate)

    @classmethod
    def from_engine(cls, engine: Engine, *, migrate: bool = True) -> Registry:
        """Use an existing engine (shared with other modules); our engine settings are added."""
        configure_engine(engine)
        registry = cls.__new__(cls)
        registry._init(engine, migrate)
        return registry

    def _init(self, engine: Engine, migrate: bool) -> None:
        self.engine = engine
        self._reader = read_only(engine)
        if migrate:
            create_schema(engine)

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision (idempotent, cheap once current)."""
        create_schema(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------

    def _write(self, fn: Callable[[Connection], T], *, retry: bool = False) -> T:
        """Run ``fn`` in one write transaction; with ``retry``, rerun it on a unique clash.

        A clash happens when another writer inserted the same adapter row or version number
        first (possible on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers); the
        rerun sees that row and moves on. A transaction PostgreSQL aborted as a serialization
        failure or deadlock victim is always rerun: nothing of it was kept.
        """
        clashes = _WRITE_RETRIES if retry else 1
        aborts = 0
        while True:
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except IntegrityError:
                clashes -= 1
                if clashes <= 0:
                    raise
            except DBAPIError as e:
                aborts += 1
                if getattr(e.orig, "sqlstate", None) not in _RERUN_SQLSTATES or aborts >= _WRITE_RETRIES:
                    raise

    @staticmethod
    def _log(conn: Connection, tenant: str, adapter: str | None, kind: str) -> None:
        lock_change_log(conn)  # seqs must commit in order (PostgreSQL), see lock_change_log
        conn.execute(insert(changes).values(tenant=tenant, adapter=adapter, kind=kind, at=utcnow()))

    @staticmethod
    def _tenant_id(conn: Connection, tenant: str, *, lock: bool = False) -> int:
        query = select(tenants.c.id).where(tenants.c.name == tenant)
        if lock:  # PostgreSQL: hold off new adapters of this tenant (their FK check waits)
            query = query.with_for_update()
        tid = conn.scalar(query)
        if tid is None:
            raise NotFoundError(f"tenant {tenant!r} not found", param="tenant")
        return int(tid)

    @staticmethod
    def _adapter_row(
        conn: Connection, tenant: str, adapter: str, *, lock: bool = False
    ) -> Row[Any]:
        """The adapter's row, found through its tenant's name so tenants never cross."""
        query = (
            select(adapters)
            .join(tenants, tenants.c.id == adapters.c.tenant_id)
            .where(tenants.c.name == tenant, adapters.c.name == adapter)
        )
        if lock:
            # Serialises alias and version changes of one adapter on PostgreSQL; SQLite
            # ignores it (its writers are already serialised).
            query = query.with_for_update(of=adapters)
        row = conn.execute(query).first()
        if row is None:
            raise AdapterNotFoundError(f"adapter {adapter!r} not found", param="adapter")
        return row

    @staticmethod
    def _version_record(tenant: str, adapter: str, row: Row[Any]) -> VersionRecord:
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

    @staticmethod
    def _tenant_record(row: Row[Any]) -> Tenant:
        m = row._mapping
        return Tenant(id=m["id"], name=m["name"], created_at=m["created_at"], quotas=dict(m["quotas"] or {}))

    def _fetch_version(
        self, conn: Connection, tenant: str, adapter: str, adapter_id: int, version: int
    ) -> VersionRecord:
        row = conn.execute(
            select(adapter_versions).where(
                adapter_versions.c.adapter_id == adapter_id,
                adapter_versions.c.version == version,
            )
        ).first()
        if row is None:
            raise AdapterNotFoundError(
                f"adapter {adapter!r} has no version {version}", param="version"
            )
        return self._version_record(tenant, adapter, row)

    @staticmethod
    def _alias_version(conn: Connection, adapter_id: int, adapter: str, alias: str) -> int:
        version = conn.scalar(
            select(adapter_aliases.c.version).where(
                adapter_aliases.c.adapter_id == adapter_id, adapter_aliases.c.alias == alias
            )
        )
        if version is None:
            raise AdapterNotFoundError(f"adapter {adapter!r} has no {alias!r} alias", param="alias")
        return int(version)

    @staticmethod
    def _orphan_keys(conn: Connection, keys: Iterable[str]) -> list[str]:
        """Of ``keys``, those no remaining version row references (safe to delete)."""
        wanted = set(keys)
        if not wanted:
            return []
        still_used: set[str] = set()
        for column in (adapter_versions.c.weights_key, adapter_versions.c.manifest_key):
            still_used.update(conn.scalars(select(column).where(column.in_(wanted))))
        return sorted(wanted - still_used)

    # -- tenants ----------------------------------------------------------------------

    def create_tenant(self, name: str, quotas: dict[str, Any] | None = None) -> Tenant:
        validate_name(name, "tenant")
        quotas = _validate_json(quotas if quotas is not None else {}, "quotas")

        def run(conn: Connection) -> Tenant:
            if conn.scalar(select(tenants.c.id).where(tenants.c.name == name)) is not None:
                raise ConflictError(f"tenant {name!r} already exists", param="tenant")
            now = utcnow()
            tid = conn.execute(
                insert(tenants).values(name=name, created_at=now, quotas=quotas)
            ).inserted_primary_key[0]
            self._log(conn, name, None, "tenant_created")
            return Tenant(id=int(tid), name=name, created_at=now, quotas=dict(quotas))

        try:
            return self._write(run)
        except IntegrityError:  # lost a race with another creator
            raise ConflictError(f"tenant {name!r} already exists", param="tenant") from None

    def get_tenant(self, name: str) -> Tenant:
        validate_name(name, "tenant")
        with self._reader.connect() as conn:
            row = conn.execute(select(tenants).where(tenants.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"tenant {name!r} not found", param="tenant")
        return self._tenant_record(row)

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
        return [self._tenant_record(r) for r in rows]

    def delete_tenant(self, name: str) -> list[str]:
        validate_name(name, "tenant")

        def run(conn: Connection) -> list[str]:
            tid = self._tenant_id(conn, name, lock=True)
            # Wait for version writers of this tenant's adapters to finish, so the keys read
            # below include every version the cascade is about to delete (no orphans).
            conn.execute(select(adapters.c.id).where(adapters.c.tenant_id == tid).with_for_update()).all()
            rows = conn.execute(
                select(adapter_versions.c.weights_key, adapter_versions.c.manifest_key)
                .join(adapters, adapters.c.id == adapter_versions.c.adapter_id)
                .where(adapters.c.tenant_id == tid)
            ).all()
            conn.execute(delete(tenants).where(tenants.c.id == tid))  # cascades
            self._log(conn, name, None, "tenant_deleted")
            return self._orphan_keys(conn, (k for r in rows for k in r))

        return self._write(run)

    # -- versions ---------------------------------------------------------------------

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
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        validate_name(status, "status")
        _validate_json(manifest, "manifest")
        metrics = _validate_json(metrics if metrics is not None else {}, "metrics")
        validate_key(weights_key)
        validate_key(manifest_key)
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex characters, got {sha256!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        if (
            not isinstance(base_fingerprint, str)
            or not 0 < len(base_fingerprint) <= MAX_FINGERPRINT_LENGTH
        ):
            raise ValueError(
                f"base_fingerprint must be a string of 1-{MAX_FINGERPRINT_LENGTH} characters"
            )

        def run(conn: Connection) -> VersionRecord:
            # The tenant row stays locked to the end: its footprint quotas are counted and the
            # version inserted in one step (concurrent creators of this tenant wait their turn).
            tid, quotas = lock_tenant(conn, tenant)
            enforce_new_version(conn, tid, quotas, adapter, nbytes)
            now = utcnow()
            try:
                row = self._adapter_row(conn, tenant, adapter, lock=True)
                aid = row.id
            except AdapterNotFoundError:
                # A concurrent creator makes this insert fail; _write reruns us and we then
                # find its row.
                aid = conn.execute(
                    insert(adapters).values(
                        tenant_id=tid, name=adapter, created_at=now, last_version=0
                    )
                ).inserted_primary_key[0]
            # The counter update takes the row's write lock, so concurrent allocators
            # serialise here and never see the same number.
            conn.execute(
                update(adapters)
                .where(adapters.c.id == aid)
                .values(last_version=adapters.c.last_version + 1)
            )
            version = int(conn.scalar(select(adapters.c.last_version).where(adapters.c.id == aid)))
            vid = conn.execute(
                insert(adapter_versions).values(
                    adapter_id=aid,
                    version=version,
                    weights_key=weights_key,
                    manifest_key=manifest_key,
                    sha256=sha256,
                    nbytes=nbytes,
                    base_fingerprint=base_fingerprint,
                    manifest=manifest,
                    metrics=metrics,
                    status=status,
                    created_at=now,
                )
            ).inserted_primary_key[0]
            self._log(conn, tenant, adapter, "version_added")
            return VersionRecord(
                id=int(vid),
                tenant=tenant,
                adapter=adapter,
                version=version,
                weights_key=weights_key,
                manifest_key=manifest_key,
                sha256=sha256,
                nbytes=nbytes,
                base_fingerprint=base_fingerprint,
                manifest=dict(manifest),
                metrics=dict(metrics),
                status=status,
                created_at=now,
            )

        return self._write(run, retry=True)

    def check_quotas(self, tenant: str, adapter: str, nbytes: int = 0) -> None:
        """Would a new version of ``adapter`` of ``nbytes`` pass the tenant's footprint quotas now?
        A cheap early answer (``QuotaExceededError`` if not) before costly work; ``add_version``
        decides for good, in its own transaction."""
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        with self._reader.connect() as conn:
            row = conn.execute(select(tenants.c.id, tenants.c.quotas).where(tenants.c.name == tenant)).first()
            if row is None:
                raise NotFoundError(f"tenant {tenant!r} not found", param="tenant")
            enforce_new_version(conn, int(row.id), TenantQuotas.stored(row.quotas), adapter, nbytes)

    def get_version(self, tenant: str, adapter: str, version: int) -> VersionRecord:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        validate_version(version)
        with self._reader.connect() as conn:
            aid = self._adapter_row(conn, tenant, adapter).id
            return self._fetch_version(conn, tenant, adapter, aid, version)

    def list_versions(self, tenant: str, adapter: str) -> list[VersionRecord]:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        with self._reader.connect() as conn:
            aid = self._adapter_row(conn, tenant, adapter).id
            rows = conn.execute(
                select(adapter_versions)
                .where(adapter_versions.c.adapter_id == aid)
                .order_by(adapter_versions.c.version)
            ).all()
        return [self._version_record(tenant, adapter, r) for r in rows]

    def get_adapter(self, tenant: str, adapter: str) -> AdapterInfo:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        with self._reader.connect() as conn:
            row = self._adapter_row(conn, tenant, adapter)
            return self._adapter_infos(conn, tenant, [row])[0]

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        validate_name(tenant, "tenant")
        with self._reader.connect() as conn:
            tid = self._tenant_id(conn, tenant)
            rows = conn.execute(
                select(adapters).where(adapters.c.tenant_id == tid).order_by(adapters.c.name)
            ).all()
            return self._adapter_infos(conn, tenant, rows)

    @staticmethod
    def _adapter_infos(conn: Connection, tenant: str, rows: list[Row[Any]]) -> list[AdapterInfo]:
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

    def set_version_status(self, tenant: str, adapter: str, version: int, status: str) -> None:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        validate_version(version)
        validate_name(status, "status")

        def run(conn: Connection) -> None:
            aid = self._adapter_row(conn, tenant, adapter, lock=True).id
            self._fetch_version(conn, tenant, adapter, aid, version)
            conn.execute(
                update(adapter_versions)
                .where(adapter_versions.c.adapter_id == aid, adapter_versions.c.version == version)
                .values(status=status)
            )
            self._log(conn, tenant, adapter, "version_status")

        self._write(run)

    def update_metrics(
        self, tenant: str, adapter: str, version: int, metrics: dict[str, Any]
    ) -> VersionRecord:
        """Merge ``metrics`` into the version's metrics (new keys win); return the record."""
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        validate_version(version)
        _validate_json(metrics, "metrics")

        def run(conn: Connection) -> VersionRecord:
            aid = self._adapter_row(conn, tenant, adapter, lock=True).id
            record = self._fetch_version(conn, tenant, adapter, aid, version)
            merged = {**record.metrics, **metrics}
            conn.execute(
                update(adapter_versions)
                .where(adapter_versions.c.id == record.id)
                .values(metrics=merged)
            )
            self._log(conn, tenant, adapter, "metrics_updated")
            return replace(record, metrics=merged)

        return self._write(run)

    def resolve(self, tenant: str, adapter: str, ref: int | str | None = None) -> VersionRecord:
        """The version ``ref`` names: None -> alias 'prod', int or "3" -> version, else alias."""
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        version: int | None = None
        alias: str | None = None
        if ref is None:
            alias = DEFAULT_ALIAS
        elif isinstance(ref, str) and _DIGITS.fullmatch(ref):
            # Cap the length before int(): a megabyte of digits is not worth converting.
            version = validate_version(int(ref) if len(ref) <= 12 else MAX_VERSION + 1)
        elif isinstance(ref, str):
            alias = validate_name(ref, "alias")
        else:
            version = validate_version(ref)
        with self._reader.connect() as conn:
            aid = self._adapter_row(conn, tenant, adapter).id
            if alias is not None:
                version = self._alias_version(conn, aid, adapter, alias)
            assert version is not None
            return self._fetch_version(conn, tenant, adapter, aid, version)

    # -- aliases ----------------------------------------------------------------------

    def set_alias(self, tenant: str, adapter: str, alias: str, version: int) -> None:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        _validate_alias(alias)
        validate_version(version)

        def run(conn: Connection) -> None:
            aid = self._adapter_row(conn, tenant, adapter, lock=True).id
            self._fetch_version(conn, tenant, adapter, aid, version)
            self._point_alias(conn, aid, alias, version, kind="set")
            self._log(conn, tenant, adapter, "alias_set")

        self._write(run, retry=True)

    @staticmethod
    def _point_alias(conn: Connection, aid: int, alias: str, version: int, *, kind: str) -> None:
        now = utcnow()
        previous = conn.scalar(
            select(adapter_aliases.c.version).where(
                adapter_aliases.c.adapter_id == aid, adapter_aliases.c.alias == alias
            )
        )
        if previous is None:
            conn.execute(
                insert(adapter_aliases).values(
                    adapter_id=aid, alias=alias, version=version, updated_at=now
                )
            )
        else:
            conn.execute(
                update(adapter_aliases)
                .where(adapter_aliases.c.adapter_id == aid, adapter_aliases.c.alias == alias)
                .values(version=version, updated_at=now)
            )
        conn.execute(
            insert(alias_history).values(
                adapter_id=aid,
                alias=alias,
                version=version,
                previous_version=previous,
                kind=kind,
                at=now,
            )
        )

    def get_aliases(self, tenant: str, adapter: str) -> dict[str, int]:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        with self._reader.connect() as conn:
            aid = self._adapter_row(conn, tenant, adapter).id
            rows = conn.execute(
                select(adapter_aliases.c.alias, adapter_aliases.c.version)
                .where(adapter_aliases.c.adapter_id == aid)
                .order_by(adapter_aliases.c.alias)
            ).all()
        return {alias: version for alias, version in rows}

    def alias_versions(self, tenant: str, adapter: str, alias: str = DEFAULT_ALIAS) -> set[int]:
        """Every version ``alias`` has pointed at, now or before (its history; deleted versions
        included): what tells a retired ``prod`` from a version that never was one."""
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        _validate_alias(alias)
        with self._reader.connect() as conn:
            aid = self._adapter_row(conn, tenant, adapter).id
            return set(conn.scalars(
                select(alias_history.c.version)
                .where(alias_history.c.adapter_id == aid, alias_history.c.alias == alias)
                .distinct()
            ))

    def rollback(self, tenant: str, adapter: str, alias: str = DEFAULT_ALIAS) -> int:
        """Point ``alias`` back at the version it had before its latest change.

        The alias history is an undo stack: each ``set_alias`` to a different version pushes,
        each rollback pops. So set 1, 2, 3 then rollback, rollback gives 2 then 1, and a
        ``set_alias`` after a rollback discards the undone entries. Versions deleted since
        are skipped. Raises ConflictError when nothing is left to roll back to.
        """
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        _validate_alias(alias)

        def run(conn: Connection) -> int:
            aid = self._adapter_row(conn, tenant, adapter, lock=True).id
            current = self._alias_version(conn, aid, adapter, alias)
            history = conn.execute(
                select(alias_history.c.kind, alias_history.c.version)
                .where(alias_history.c.adapter_id == aid, alias_history.c.alias == alias)
                .order_by(alias_history.c.id)
            ).all()
            stack = _undo_stack(history)
            existing = set(
                conn.scalars(
                    select(adapter_versions.c.version).where(adapter_versions.c.adapter_id == aid)
                )
            )
            # Drop the current entry, then anything deleted or equal to the current version.
            stack = stack[:-1]
            while stack and (stack[-1] not in existing or stack[-1] == current):
                stack.pop()
            if not stack:
                raise ConflictError(
                    f"alias {alias!r} of adapter {adapter!r}: nothing to roll back to",
                    param="alias",
                )
            target = stack[-1]
            self._point_alias(conn, aid, alias, target, kind="rollback")
            self._log(conn, tenant, adapter, "alias_rollback")
            return target

        return self._write(run)

    # -- deletion ---------------------------------------------------------------------

    def delete_adapter(self, tenant: str, adapter: str) -> list[str]:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")

        def run(conn: Connection) -> list[str]:
            aid = self._adapter_row(conn, tenant, adapter, lock=True).id
            rows = conn.execute(
                select(adapter_versions.c.weights_key, adapter_versions.c.manifest_key).where(
                    adapter_versions.c.adapter_id == aid
                )
            ).all()
            conn.execute(delete(adapters).where(adapters.c.id == aid))  # cascades
            self._log(conn, tenant, adapter, "adapter_deleted")
            return self._orphan_keys(conn, (k for r in rows for k in r))

        return self._write(run)

    def delete_version(self, tenant: str, adapter: str, version: int) -> list[str]:
        validate_name(tenant, "tenant")
        validate_name(adapter, "adapter")
        validate_version(version)

        def run(conn: Connection) -> list[str]:
            aid = self._adapter_row(conn, tenant, adapter, lock=True).id
            record = self._fetch_version(conn, tenant, adapter, aid, version)
            pointing = sorted(
                conn.scalars(
                    select(adapter_aliases.c.alias).where(
                        adapter_aliases.c.adapter_id == aid, adapter_aliases.c.version == version
                    )
                )
            )
            if pointing:
                raise ConflictError(
                    f"version {version} of adapter {adapter!r} is in use by alias "
                    f"{', '.join(repr(a) for a in pointing)}; move the alias first",
                    param="version",
                )
            conn.execute(delete(adapter_versions).where(adapter_versions.c.id == record.id))
            self._log(conn, tenant, adapter, "version_deleted")
            return self._orphan_keys(conn, (record.weights_key, record.manifest_key))

        return self._write(run)

    # -- change feed ------------------------------------------------------------------

    def change_seq(self) -> int:
        with self._reader.connect() as conn:
            return int(conn.scalar(select(func.coalesce(func.max(changes.c.seq), 0))) or 0)

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be a non-negative int, got {seq!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_CHANGES_PAGE:
            raise ValueError(f"limit must be an int in 1..{MAX_CHANGES_PAGE}, got {limit!r}")
        with self._reader.connect() as conn:
            rows = conn.execute(
                select(changes).where(changes.c.seq > seq).order_by(changes.c.seq).limit(limit)
            ).all()
        return [Change(seq=r.seq, tenant=r.tenant, adapter=r.adapter, kind=r.kind, at=r.at) for r in rows]


def _undo_stack(history: Iterable[Row[Any] | tuple[str, int]]) -> list[int]:
    """Replay alias history into the stack of versions rollback walks back through."""
    stack: list[int] = []
    for kind, version in history:
        if kind == "rollback":
            # A rollback row names its target, which is on the stack: pop down to it.
            while stack and stack[-1] != version:
                stack.pop()
            if not stack:  # defensive: history edited by hand
                stack.append(version)
        elif not stack or stack[-1] != version:
            stack.append(version)  # re-setting the same version is not a new step
    return stack
