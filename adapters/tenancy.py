"""Creating and deleting a tenant (and revoking its keys): what comes with one, what goes with it, in what order.

``create_tenant`` checks the name (``adapters.names``) and the quotas (``TenantQuotas.from_dict``:
unknown keys and bad values are refused, naming them) before anything is written, creates the
tenant row, then its first API key. The two are separate transactions: a crash between them
leaves a tenant without a key, which ``KeyStore.create`` mends; never a key without a tenant.

``delete_tenant`` removes, in this order:

1. nothing at all if the tenant does not exist (``NotFoundError`` before anything is touched);
2. in one registry transaction (``Registry.delete_tenant``), the tenant row and by cascade its
   API keys, adapters (versions, aliases, alias history), uploaded files' rows and jobs (with
   their events), and a ``tenant_deleted`` entry in the change log: from that commit on, no
   key of the tenant authenticates and no adapter of it resolves, in any process once it has
   polled the change log;
3. the store objects of its adapter versions, then every object under ``tenants/<name>/``
   (uploaded files, jobs' data, shared checkpoints, whatever else lies there): steps 2 and 3
   are ``Catalog.delete_tenant``;
4. this process's caches (``ChangeListener.tenant_deleted``), at once, even when step 3 failed.

Rows go before bytes, so a crash or a store outage after step 2 leaves objects that no row
refers to, never a row without its bytes. The store GC (``adapters.store_gc.collect``) deletes
them once older than its grace period: the change log keeps the deleted name, which tells the GC
the prefix belonged to this database. A store outage in step 3 raises ``StoreUnavailableError``
(the rows are gone already; deleting again answers ``NotFoundError``).

A tenant deleted while its jobs are queued or running: the queued jobs go with the rows and no
worker ever claims them. A running job's worker finds its job gone at its next heartbeat
(``LostJobError``), stops training at its next step and can record no outcome; a publish it
attempts meanwhile registers nothing (``Registry.add_version`` finds no tenant:
``NotFoundError``, and ``Catalog.publish`` deletes the bytes it had written). A checkpoint the
worker shares after step 3 lies unreferenced under the tenant's prefix, where the store GC
finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.catalog import Catalog
from adapters.change_listener import NO_LISTENER, ChangeListener
from adapters.keys import KeyStore
from adapters.names import validate_name
from adapters.quotas import TenantQuotas
from adapters.registry import Registry, Tenant


@dataclass(frozen=True)
class NewTenant:
    tenant: Tenant
    key_id: str
    api_key: str  # the secret: shown once, only its hash is stored


def create_tenant(registry: Registry, keys: KeyStore, name: str,
                  quotas: dict[str, Any] | None = None) -> NewTenant:
    """Create tenant ``name`` with ``quotas`` (unset: defaults) and its first API key."""
    validate_name(name, "name")
    TenantQuotas.from_dict(quotas)  # refuses unknown keys and bad values, naming them
    tenant = registry.create_tenant(name, quotas=quotas or {})
    key_id, secret = keys.create(name)
    return NewTenant(tenant=tenant, key_id=key_id, api_key=secret)


def delete_tenant(catalog: Catalog, name: str, *, listener: ChangeListener = NO_LISTENER) -> int:
    """Delete tenant ``name`` with everything it owns (see the module docstring for the order
    and what a crash leaves); returns how many store objects were removed."""
    validate_name(name, "name")
    catalog.registry.get_tenant(name)  # NotFoundError before anything is touched
    try:
        return catalog.delete_tenant(name)  # rows, then bytes
    finally:
        listener.tenant_deleted(name)


def revoke_key(keys: KeyStore, tenant: str, key_id: str, *, listener: ChangeListener = NO_LISTENER) -> Any:
    """Revoke ``tenant``'s key ``key_id`` (its record, revoked); the listener is told after the
    revocation committed, so this process refuses the key in its very next request (the others
    within their key cache's poll of the change log)."""
    key = keys.revoke(tenant, key_id)
    listener.key_revoked(tenant)
    return key
