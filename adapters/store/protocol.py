"""The store contract: ``AdapterStore``, the narrow interface every blob store implements.

Contract of every ``AdapterStore`` (``LocalStore`` in ``adapters.store.local``, ``S3Store`` in
``adapters.store.s3``):

* Keys are ``/``-joined segments, each matching ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``
  (so never ``.``, ``..`` or a hidden name), no empty segment, no leading or trailing ``/``,
  at most 512 characters. ``validate_key`` (``adapters.names``) is applied to every key and
  prefix before the backend is touched; a bad one raises ``InvalidNameError``.
* A prefix is ``""`` (the whole store) or a valid key with an optional trailing ``/``. It is
  segment-aligned: ``"t1/a"`` and ``"t1/a/"`` both mean "keys strictly under ``t1/a/``" and
  never match ``t1/ab/...``.
* ``put`` is atomic: a reader sees either no key or the complete bytes, never a partial
  file, even if the writer crashes. It returns the sha256 hex of the bytes.
* ``get`` raises ``NotFoundError`` for a missing key, ``ArtifactError`` when the object is
  larger than ``max_bytes`` (checked before reading it), ``ChecksumMismatchError`` when
  ``sha256`` is given and differs. Bytes returned with ``sha256`` given are verified.
* ``delete`` is idempotent; ``list`` is sorted, and so is ``entries`` (the same keys with
  their size and last-modified time, for garbage collection).
* A checksum mismatch is logged (warning, logger ``tailor.store``) as well as raised: it
  means an object changed behind the registry's back.
* A backend that cannot be reached raises ``StoreUnavailableError`` (HTTP 503, retry);
  nothing was half-written.
* Keys are names, not directories. ``LocalStore`` cannot hold both ``a/b`` and ``a/b/c``
  (``ConflictError``); S3 can. Callers never need both: every object is a file name under a
  fresh prefix.

``check_size`` and ``verify_sha256`` are the size and checksum checks every backend's ``get``
applies, so they refuse and log in the same words.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from adapters.errors import ArtifactError, ChecksumMismatchError

log = logging.getLogger("tailor.store")


@runtime_checkable
class AdapterStore(Protocol):
    """The narrow interface every blob store implements (``LocalStore``, ``S3Store``)."""

    @property
    def url(self) -> str: ...

    def put(self, key: str, data: bytes) -> str: ...

    def get(
        self, key: str, *, sha256: str | None = None, max_bytes: int | None = None
    ) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> builtins.list[str]: ...

    def entries(self, prefix: str = "") -> builtins.list[StoreEntry]: ...

    def cleanup_temp(self, older_than_s: float = 3600) -> int: ...

    def size(self, key: str) -> int: ...


@dataclass(frozen=True)
class StoreEntry:
    key: str
    size: int
    modified: float  # seconds since the epoch, as the backend reports it


def check_size(key: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ArtifactError(
            f"object {key!r} is {size} bytes, over the limit of {max_bytes} bytes", param="key"
        )


def verify_sha256(key: str, data: bytes, expected: str, *, where: str = "") -> None:
    """Raise ``ChecksumMismatchError`` (and log it) unless ``data`` hashes to ``expected``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        # Refused and logged: someone or something rewrote the object outside put().
        log.warning("checksum mismatch on store object %r%s: expected sha256 %s, got %s; refused",
                    key, where, expected, actual)
        raise ChecksumMismatchError(
            f"object {key!r} is corrupt: expected sha256 {expected}, got {actual}", param="key"
        )


