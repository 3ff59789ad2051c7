"""Resolution and the resident cache of one base's adapters: what every engine kind shares.

``AdapterAccess`` is a mixin for an engine (``adapters.runtime.engine.Engine``, the classifiers';
``adapters.generation.engine.GenerationEngine``) that has ``base`` (with ``spec`` and ``dtype``),
``catalog``, ``resolver`` (``Resolver``), ``cache`` (``ResidentCache``), ``slots`` (``SlotBank``)
and ``task_name`` (the canonical task it serves). Contract, the same for every engine:

* ``resolve(tenant, ref)`` turns ``"name"`` / ``"name@3"`` / ``"name@prod"`` into one immutable
  version (``ResolvedAdapter``; a bare name means ``prod``). An adapter that does not exist,
  belongs to another tenant or lacks the version raises ``AdapterNotFoundError``: never a
  fallback to the base model.
* ``resident(tenant, ref)`` answers ``resolve`` + ``acquire`` from memory alone, or None when
  that needs the registry or the store; it never blocks on I/O.
* ``acquire`` returns the decoded adapter from the resident cache, loading it on a miss; an
  adapter of another task is a ``TaskMismatchError`` naming both tasks (before its bytes are
  read), bad bytes an ``ArtifactError`` for that adapter only.
* ``refresh`` shows this process its own alias change at once; ``forget`` drops every resident
  copy (resolutions, host cache, device slots) of a deleted adapter or tenant. Both then call
  ``drop_derived(match)``, where an engine kind drops its own copies (generation's row images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters.artifact import check_task
from adapters.errors import ArtifactError
from adapters.names import parse_ref, validate_name
from adapters.registry import VersionRecord
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.tasks import task_of_manifest


@dataclass(frozen=True)
class ResolvedAdapter:
    key: VersionKey
    record: VersionRecord

    @property
    def ref(self) -> str:
        return f"{self.key.adapter}@{self.key.version}"


class AdapterAccess:
    """The shared resolution and loading half of an engine (see the module docstring)."""

    base: Any
    catalog: Any
    resolver: Any
    cache: Any
    slots: Any
    task_name: str

    def resolve(self, tenant: str, ref: str) -> ResolvedAdapter:
        validate_name(tenant, "tenant")
        name, selector = parse_ref(ref)
        record = self.resolver.resolve(tenant, name, selector)
        key = VersionKey(tenant=tenant, adapter=name, version=record.version, sha256=record.sha256)
        return ResolvedAdapter(key=key, record=record)

    def resident(self, tenant: str, ref: str) -> tuple[ResolvedAdapter, LoadedAdapter] | None:
        """``resolve`` + ``acquire`` answered from memory alone, or None when that needs the
        registry or the store (then call those). Never blocks on I/O: an async caller may use it
        on its event loop. Names are validated exactly as ``resolve`` does."""
        validate_name(tenant, "tenant")
        name, selector = parse_ref(ref)
        record = self.resolver.cached(tenant, name, selector)
        if record is None:
            return None
        key = VersionKey(tenant=tenant, adapter=name, version=record.version, sha256=record.sha256)
        loaded = self.cache.peek(key)
        return None if loaded is None else (ResolvedAdapter(key=key, record=record), loaded)

    def acquire(self, resolved: ResolvedAdapter) -> LoadedAdapter:
        return self.cache.get(resolved.key, lambda: self._load(resolved))

    def prefetch(self, tenant: str, refs: list[str]) -> list[LoadedAdapter]:
        """Load known-hot adapters into the resident set ahead of traffic."""
        return [self.acquire(self.resolve(tenant, ref)) for ref in refs]

    def _load(self, resolved: ResolvedAdapter) -> LoadedAdapter:
        try:
            task = task_of_manifest(resolved.record.manifest)
        except ValueError as e:
            raise ArtifactError(f"adapter manifest: {e}", param="adapter") from None
        check_task(task, self.task_name)  # before any bytes are read; check_base checks it again
        artifact = self.catalog.read(resolved.record, self.base.spec)
        return LoadedAdapter.from_artifact(resolved.key, artifact, self.base.dtype)

    def refresh(self, tenant: str, adapter: str | None = None) -> None:
        """See this process's own alias changes at once (other processes' within the poll)."""
        self.resolver.invalidate(tenant, adapter)
        self.drop_derived(_matcher(tenant, adapter))  # a replaced version's derived copies go with it

    def forget(self, tenant: str, adapter: str | None = None) -> None:
        """Drop resident copies of a deleted adapter (or of every adapter of a tenant)."""
        match = _matcher(tenant, adapter)
        self.resolver.invalidate(tenant, adapter)
        self.cache.discard(match)
        self.slots.drop(match)
        self.drop_derived(match)

    def drop_derived(self, match: Callable[[VersionKey], bool]) -> None:
        """Drop what the engine derived from the versions ``match`` selects, beyond the resident
        cache and the slots (an engine kind that lays adapters out again overrides it; none here)."""

    def check_adapter(self, adapter: LoadedAdapter) -> None:
        """Refuse (``TaskMismatchError``) an adapter of another task than this engine's."""
        check_task(adapter.manifest.kind, self.task_name)


def _matcher(tenant: str, adapter: str | None) -> Callable[[VersionKey], bool]:
    def match(k: VersionKey) -> bool:
        return k.tenant == tenant and (adapter is None or k.adapter == adapter)

    return match
