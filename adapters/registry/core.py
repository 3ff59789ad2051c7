"""The registry's plumbing: its engine, its one write path, and the row lookups every part shares.

``RegistryCore`` is the base of each part of ``Registry`` (tenants, versions, aliases). It
guarantees:

* Every write is one ``adapters.schema.transaction`` on the registry's engine (``_write``):
  one transaction, rerun on serialization failures and deadlocks (and, where asked, on a
  unique clash with a concurrent writer), that also appends the write's entry to the change
  log, so no change goes unlogged. Every read uses a read-only connection that never queues
  behind writers (``adapters.schema.read_only``).
* ``_write_adapter(tenant, adapter, kind, fn)`` is the preamble of every change to an existing
  adapter: one retrying write transaction; the adapter's row, found through its tenant's name
  (so tenants never cross) and locked (PostgreSQL: changes to one adapter's versions and
  aliases serialise); ``fn`` run on that ``AdapterRow``; the change logged as ``kind`` when
  ``fn`` returns. If ``fn`` raises, nothing is written and nothing logged. ``_read_adapter``
  is the same for reads, without lock or log. Both leave checking the arguments to the caller
  (``checks.validate_refs``), which does it before calling them: before any query.
* A missing adapter, or another tenant's, is ``AdapterNotFoundError`` naming only the
  caller's adapter; likewise a missing version or alias (``AdapterRow.version`` / ``alias``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from sqlalchemy import Connection, Engine, Row, select

from adapters.errors import AdapterNotFoundError, NotFoundError
from adapters.registry.changelog import log_change
from adapters.registry.records import VersionRecord, version_record
from adapters.schema import (
    adapter_aliases,
    adapter_versions,
    adapters,
    configure_engine,
    create_schema,
    make_engine,
    read_only,
    tenants,
    transaction,
)

T = TypeVar("T")


@dataclass(frozen=True)
class AdapterRow:
    """One adapter's row, as read on ``conn`` for ``tenant`` by the name ``name``."""

    conn: Connection
    tenant: str
    name: str
    row: Row[Any]

    @classmethod
    def find(cls, conn: Connection, tenant: str, adapter: str, *, lock: bool = False) -> AdapterRow:
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
        return cls(conn, tenant, adapter, row)

    @property
    def id(self) -> int:
        return int(self.row.id)

    def version(self, version: int) -> VersionRecord:
        row = self.conn.execute(
            select(adapter_versions).where(
                adapter_versions.c.adapter_id == self.id, adapter_versions.c.version == version
            )
        ).first()
        if row is None:
            raise AdapterNotFoundError(
                f"adapter {self.name!r} has no version {version}", param="version"
            )
        return version_record(self.tenant, self.name, row)

    def alias(self, alias: str) -> int:
        """The version ``alias`` points at."""
        version = self.conn.scalar(
            select(adapter_aliases.c.version).where(
                adapter_aliases.c.adapter_id == self.id, adapter_aliases.c.alias == alias
            )
        )
        if version is None:
            raise AdapterNotFoundError(f"adapter {self.name!r} has no {alias!r} alias", param="alias")
        return int(version)

    def version_numbers(self) -> set[int]:
        return set(self.conn.scalars(
            select(adapter_versions.c.version).where(adapter_versions.c.adapter_id == self.id)
        ))


def tenant_id(conn: Connection, tenant: str, *, lock: bool = False) -> int:
    query = select(tenants.c.id).where(tenants.c.name == tenant)
    if lock:  # PostgreSQL: hold off new adapters of this tenant (their FK check waits)
        query = query.with_for_update()
    tid = conn.scalar(query)
    if tid is None:
        raise NotFoundError(f"tenant {tenant!r} not found", param="tenant")
    return int(tid)


def orphan_keys(conn: Connection, keys: Iterable[str]) -> list[str]:
    """Of ``keys``, those no remaining version row references (safe to delete)."""
    wanted = set(keys)
    if not wanted:
        return []
    still_used: set[str] = set()
    for column in (adapter_versions.c.weights_key, adapter_versions.c.manifest_key):
        still_used.update(conn.scalars(select(column).where(column.in_(wanted))))
    return sorted(wanted - still_used)


class RegistryCore:
    """The engine and the transaction plumbing shared by every part of ``Registry``."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Open ``url``; ``migrate=False`` connects lazily and leaves ``create_schema`` to the caller
        (the service does, retrying while the database is unreachable)."""
        self._init(make_engine(url), migrate)

    @classmethod
    def from_engine(cls, engine: Engine, *, migrate: bool = True) -> Self:
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Every change this registry makes is logged through here (a test widens the commit race
    # of the change log by overriding it).
    _log = staticmethod(log_change)

    def _write(
        self, fn: Callable[[Connection], T], *, change: tuple[str, str | None, str],
        rerun_on_clash: bool = False,
    ) -> T:
        """Run ``fn`` in one retrying write transaction, then log ``change`` (tenant, adapter or
        None, kind) in the same transaction."""
        def run(conn: Connection) -> T:
            result = fn(conn)
            self._log(conn, *change)
            return result

        return transaction(self.engine, run, rerun_on_clash=rerun_on_clash)

    def _write_adapter(
        self, tenant: str, adapter: str, kind: str, fn: Callable[[AdapterRow], T],
        *, rerun_on_clash: bool = False,
    ) -> T:
        return self._write(
            lambda conn: fn(AdapterRow.find(conn, tenant, adapter, lock=True)),
            change=(tenant, adapter, kind), rerun_on_clash=rerun_on_clash,
        )

    def _read_adapter(self, tenant: str, adapter: str, fn: Callable[[AdapterRow], T]) -> T:
        with self._reader.connect() as conn:
            return fn(AdapterRow.find(conn, tenant, adapter))
