"""What a control-plane write tells the caches of the process that made it, at once.

A serving process remembers tenants' adapters and keys: the engine's resolver (``name@alias``
-> version), its resident adapters and device slots, and the key cache (verified API keys).
Every process learns of a write through the registry's change log within its poll (0.25 s);
the process that made the write must not wait for its own poll (a promotion answered 200 must
route that client's next request to the new version; a deleted tenant's key must stop working
in the very next request). So every library function that changes what a tenant's adapter
resolves to, or deletes something, takes a ``ChangeListener`` and tells it, after its rows have
committed (never before: a listener that re-reads must see the change):

* ``adapter_changed(tenant, adapter)`` -- a version was added or an alias moved: resolve anew;
* ``adapter_deleted(tenant, adapter)`` -- the adapter is gone: drop its resident copies too;
* ``tenant_deleted(tenant)`` -- the tenant is gone: drop everything of it, its keys included;
* ``key_revoked(tenant)`` -- one of its API keys was revoked: forget the tenant's verified keys.

A listener must not raise for a tenant or adapter it never saw. ``NO_LISTENER`` suits a process
that caches nothing (a command-line tool, a control plane with no engine loaded): the change log
still reaches every serving process. ``ProcessCaches`` tells an engine (when one is loaded) and a
key cache; the library never needs an engine just to administer tenants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ChangeListener(Protocol):
    def adapter_changed(self, tenant: str, adapter: str) -> None: ...

    def adapter_deleted(self, tenant: str, adapter: str) -> None: ...

    def tenant_deleted(self, tenant: str) -> None: ...

    def key_revoked(self, tenant: str) -> None: ...


class AdapterCaches(Protocol):
    """What an engine keeps per adapter (``adapters.runtime.engine.Engine`` is one)."""

    def refresh(self, tenant: str, adapter: str | None = None) -> None: ...

    def forget(self, tenant: str, adapter: str | None = None) -> None: ...


class KeyCaches(Protocol):
    """What a key cache keeps per tenant (``adapters.key_cache.KeyCache`` is one)."""

    def forget_tenant(self, tenant: str) -> None: ...


class _NoListener:
    def adapter_changed(self, tenant: str, adapter: str) -> None:
        pass

    def adapter_deleted(self, tenant: str, adapter: str) -> None:
        pass

    def tenant_deleted(self, tenant: str) -> None:
        pass

    def key_revoked(self, tenant: str) -> None:
        pass


NO_LISTENER: ChangeListener = _NoListener()


@dataclass(frozen=True)
class ProcessCaches:
    """This process's engine (None while none is loaded) and key cache, told together."""

    engine: AdapterCaches | None = None
    key_cache: KeyCaches | None = None

    def adapter_changed(self, tenant: str, adapter: str) -> None:
        if self.engine is not None:
            self.engine.refresh(tenant, adapter)

    def adapter_deleted(self, tenant: str, adapter: str) -> None:
        if self.engine is not None:
            self.engine.forget(tenant, adapter)

    def tenant_deleted(self, tenant: str) -> None:
        if self.key_cache is not None:
            self.key_cache.forget_tenant(tenant)
        if self.engine is not None:
            self.engine.forget(tenant)

    def key_revoked(self, tenant: str) -> None:
        if self.key_cache is not None:
            self.key_cache.forget_tenant(tenant)
