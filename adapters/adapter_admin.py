"""A tenant's changes to what its adapters serve: move an alias, roll it back, delete an adapter.

Each is one registry transaction (``Registry.set_alias``, ``rollback``, ``delete_adapter``: they
validate the names and raise ``NotFoundError``/``ConflictError`` as the registry does), then the
``ChangeListener`` is told, after the commit, so the process that made the change serves it at
once; every other process sees it through the change log within its poll. Deleting an adapter
removes its rows first, then the store objects no other version refers to
(``Catalog.delete_adapter``): a crash or a store outage in between leaves unreferenced objects
for the store GC (the listener is told all the same).

``AliasMove.previous`` is the version the alias named just before the change, read in its own
transaction: under concurrent changes of the same alias it may name an intermediate version.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.catalog import Catalog
from adapters.change_listener import NO_LISTENER, ChangeListener
from adapters.registry import Registry


@dataclass(frozen=True)
class AliasMove:
    adapter: str
    alias: str
    version: int  # where the alias points now
    previous: int | None  # where it pointed before (None: it did not exist)
    aliases: dict[str, int]  # every alias of the adapter after the change


def set_alias(registry: Registry, tenant: str, adapter: str, alias: str, version: int, *,
              listener: ChangeListener = NO_LISTENER) -> AliasMove:
    """Point ``alias`` of ``tenant``'s ``adapter`` at ``version`` (promote, for ``prod``)."""
    before = registry.get_aliases(tenant, adapter)
    registry.set_alias(tenant, adapter, alias, version)
    listener.adapter_changed(tenant, adapter)
    return AliasMove(adapter, alias, version, before.get(alias), registry.get_aliases(tenant, adapter))


def rollback(registry: Registry, tenant: str, adapter: str, alias: str = "prod", *,
             listener: ChangeListener = NO_LISTENER) -> AliasMove:
    """Point ``alias`` back at the version it had before its latest change."""
    before = registry.get_aliases(tenant, adapter)
    version = registry.rollback(tenant, adapter, alias)
    listener.adapter_changed(tenant, adapter)
    return AliasMove(adapter, alias, version, before.get(alias), registry.get_aliases(tenant, adapter))


def delete_adapter(catalog: Catalog, tenant: str, adapter: str, *,
                   listener: ChangeListener = NO_LISTENER) -> int:
    """Delete ``tenant``'s ``adapter`` with all its versions; returns the store objects removed."""
    try:
        return catalog.delete_adapter(tenant, adapter)
    finally:  # also when the store failed after the rows were gone
        listener.adapter_deleted(tenant, adapter)
