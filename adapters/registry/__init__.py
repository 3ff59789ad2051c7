"""Registry of tenants, adapters, versions and aliases, kept in SQL (SQLAlchemy Core).

The same code runs on ``sqlite:///path.db`` and ``postgresql://...``; tables live in
``adapters.schema``. ``Registry`` is one object made of parts, one module each:
``tenants``, ``versions`` (adapters and their versions), ``aliases`` (aliases, resolution,
rollback) and ``changelog``, over ``core`` (engine, the write path, row lookups), ``records``
(what is returned) and ``checks`` (argument checks). Contract a caller may rely on:

* Every tenant/adapter/alias argument is checked with ``validate_name`` and every version
  must be an int in ``1..2**31-1``, before any query runs (``InvalidNameError`` otherwise).
* Every write is one transaction (``adapters.schema.transaction``); a failed call leaves no
  partial rows.
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

from adapters.registry.aliases import DEFAULT_ALIAS, Aliases
from adapters.registry.changelog import MAX_CHANGES_PAGE, ChangeLog
from adapters.registry.checks import MAX_FINGERPRINT_LENGTH, MAX_VERSION, validate_version
from adapters.registry.records import AdapterInfo, Change, Tenant, VersionRecord
from adapters.registry.tenants import Tenants
from adapters.registry.versions import DEFAULT_STATUS, Versions

__all__ = [
    "DEFAULT_ALIAS", "DEFAULT_STATUS", "MAX_CHANGES_PAGE", "MAX_FINGERPRINT_LENGTH", "MAX_VERSION",
    "AdapterInfo", "Change", "Registry", "Tenant", "VersionRecord", "validate_version",
]


class Registry(Tenants, Versions, Aliases, ChangeLog):
    """Tenants, adapters, versions and aliases in one SQL database.

    ``Registry(url)`` opens a database (migrating it unless ``migrate=False``);
    ``Registry.from_engine(engine)`` shares an engine with other modules.
    """
