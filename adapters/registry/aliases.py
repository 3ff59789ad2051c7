"""Aliases of an adapter's versions, resolution of a reference, and rollback.

* ``resolve(tenant, adapter, ref)`` returns exactly the version ``ref`` names (None: the
  ``prod`` alias; an int or an all-digit string: that version; any other string: that alias) or
  raises ``AdapterNotFoundError``; it never falls back. A missing adapter, another tenant's
  adapter and a missing version or alias all raise that error, and its message names only the
  caller's own adapter, version or alias, so tenants cannot probe each other.
* ``set_alias`` points an alias at an existing version; every move is kept in the alias's
  history, which ``rollback`` replays as an undo stack (see there) and ``alias_versions`` reads.
* An alias is never all digits (it could not be told from a version number).
* Every write logs its change: ``alias_set``, ``alias_rollback``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Row, insert, select, update

from adapters.errors import ConflictError
from adapters.names import validate_name
from adapters.registry.checks import DIGITS, MAX_VERSION, validate_refs, validate_version
from adapters.registry.core import AdapterRow, RegistryCore
from adapters.registry.records import VersionRecord
from adapters.schema import adapter_aliases, alias_history, utcnow

DEFAULT_ALIAS = "prod"


class Aliases(RegistryCore):
    """The alias and resolution part of ``Registry``."""

    def resolve(self, tenant: str, adapter: str, ref: int | str | None = None) -> VersionRecord:
        """The version ``ref`` names: None -> alias 'prod', int or "3" -> version, else alias."""
        validate_refs(tenant, adapter)
        target = _parse_ref(ref)
        return self._read_adapter(
            tenant, adapter, lambda a: a.version(target if isinstance(target, int) else a.alias(target))
        )

    def set_alias(self, tenant: str, adapter: str, alias: str, version: int) -> None:
        validate_refs(tenant, adapter, alias=alias, version=version)
        self._write_adapter(tenant, adapter, "alias_set", lambda a: _set(a, alias, version), rerun_on_clash=True)

    def get_aliases(self, tenant: str, adapter: str) -> dict[str, int]:
        validate_refs(tenant, adapter)
        return self._read_adapter(tenant, adapter, _aliases)

    def alias_versions(self, tenant: str, adapter: str, alias: str = DEFAULT_ALIAS) -> set[int]:
        """Every version ``alias`` has pointed at, now or before (its history; deleted versions
        included): what tells a retired ``prod`` from a version that never was one."""
        validate_refs(tenant, adapter, alias=alias)
        return self._read_adapter(tenant, adapter, lambda a: set(a.conn.scalars(
            select(alias_history.c.version)
            .where(alias_history.c.adapter_id == a.id, alias_history.c.alias == alias)
            .distinct()
        )))

    def rollback(self, tenant: str, adapter: str, alias: str = DEFAULT_ALIAS) -> int:
        """Point ``alias`` back at the version it had before its latest change.

        The alias history is an undo stack: each ``set_alias`` to a different version pushes,
        each rollback pops. So set 1, 2, 3 then rollback, rollback gives 2 then 1, and a
        ``set_alias`` after a rollback discards the undone entries. Versions deleted since
        are skipped. Raises ConflictError when nothing is left to roll back to.
        """
        validate_refs(tenant, adapter, alias=alias)
        return self._write_adapter(tenant, adapter, "alias_rollback", lambda a: _roll_back(a, alias))


def _parse_ref(ref: int | str | None) -> int | str:
    """What ``ref`` names: a version number (int) or an alias (str)."""
    if ref is None:
        return DEFAULT_ALIAS
    if isinstance(ref, str) and DIGITS.fullmatch(ref):
        # Cap the length before int(): a megabyte of digits is not worth converting.
        return validate_version(int(ref) if len(ref) <= 12 else MAX_VERSION + 1)
    if isinstance(ref, str):
        return validate_name(ref, "alias")
    return validate_version(ref)


def _set(a: AdapterRow, alias: str, version: int) -> None:
    a.version(version)  # it must exist
    _point(a, alias, version, kind="set")


def _aliases(a: AdapterRow) -> dict[str, int]:
    rows = a.conn.execute(
        select(adapter_aliases.c.alias, adapter_aliases.c.version)
        .where(adapter_aliases.c.adapter_id == a.id)
        .order_by(adapter_aliases.c.alias)
    ).all()
    return {alias: version for alias, version in rows}


def _point(a: AdapterRow, alias: str, version: int, *, kind: str) -> None:
    """Point ``alias`` at ``version`` and push the move onto the alias's history."""
    now = utcnow()
    at_alias = (adapter_aliases.c.adapter_id == a.id) & (adapter_aliases.c.alias == alias)
    previous = a.conn.scalar(select(adapter_aliases.c.version).where(at_alias))
    if previous is None:
        a.conn.execute(
            insert(adapter_aliases).values(adapter_id=a.id, alias=alias, version=version, updated_at=now)
        )
    else:
        a.conn.execute(update(adapter_aliases).where(at_alias).values(version=version, updated_at=now))
    a.conn.execute(insert(alias_history).values(
        adapter_id=a.id, alias=alias, version=version, previous_version=previous, kind=kind, at=now,
    ))


def _roll_back(a: AdapterRow, alias: str) -> int:
    current = a.alias(alias)
    history = a.conn.execute(
        select(alias_history.c.kind, alias_history.c.version)
        .where(alias_history.c.adapter_id == a.id, alias_history.c.alias == alias)
        .order_by(alias_history.c.id)
    ).all()
    existing = a.version_numbers()
    # Drop the current entry, then anything deleted or equal to the current version.
    stack = _undo_stack(history)[:-1]
    while stack and (stack[-1] not in existing or stack[-1] == current):
        stack.pop()
    if not stack:
        raise ConflictError(
            f"alias {alias!r} of adapter {a.name!r}: nothing to roll back to", param="alias"
        )
    _point(a, alias, stack[-1], kind="rollback")
    return stack[-1]


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
