"""The registry's argument checks, run before any query: a bad argument never reaches SQL.

* Tenant, adapter, alias and status names follow ``adapters.names.validate_name``; an alias
  may in addition not be all digits (``resolve`` reads such a ref as a version number).
* A version is an ``int`` in ``1..MAX_VERSION`` (``bool`` is not an int here).
* Every failure is an ``InvalidNameError`` naming the argument, except a new version's
  checksum, size and fingerprint (``check_version_fields``: ``ValueError``; its store keys
  follow ``adapters.names.validate_key``) and JSON arguments (``TypeError``).
* ``validate_refs`` checks, in this order, the tenant, the adapter, the alias, the version and
  the status it is given: a call with several bad arguments reports the first of these.
"""

from __future__ import annotations

import re
from typing import Any, Final

from adapters.errors import InvalidNameError
from adapters.names import validate_key, validate_name

MAX_VERSION = 2**31 - 1
MAX_FINGERPRINT_LENGTH = 128
DIGITS = re.compile(r"[0-9]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _NotGiven:
    """Marks an argument ``validate_refs`` was not asked to check (None is a value to refuse)."""


NOT_GIVEN: Final = _NotGiven()


def validate_version(value: object) -> int:
    """Return ``value`` if it is a version number (int in 1..2**31-1), else raise."""
    # bool is an int subclass; True must not mean version 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise InvalidNameError(
            f"invalid version {value!r}: use a positive integer", param="version"
        )
    return value


def validate_alias(alias: object) -> str:
    validate_name(alias, "alias")
    assert isinstance(alias, str)
    # resolve() reads an all-digit ref as a version number, so such an alias could never
    # be reached by name.
    if DIGITS.fullmatch(alias):
        raise InvalidNameError(
            f"invalid alias {alias!r}: an alias must not be a number", param="alias"
        )
    return alias


def validate_refs(
    tenant: object,
    adapter: object = NOT_GIVEN,
    *,
    alias: object = NOT_GIVEN,
    version: object = NOT_GIVEN,
    status: object = NOT_GIVEN,
) -> None:
    """Check each argument given, in the order of the module docstring."""
    validate_name(tenant, "tenant")
    if adapter is not NOT_GIVEN:
        validate_name(adapter, "adapter")
    if alias is not NOT_GIVEN:
        validate_alias(alias)
    if version is not NOT_GIVEN:
        validate_version(version)
    if status is not NOT_GIVEN:
        validate_name(status, "status")


def validate_json(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def check_version_fields(
    weights_key: str, manifest_key: str, sha256: str, nbytes: int, base_fingerprint: str
) -> None:
    """The file fields of a new version: store keys, checksum, size and base fingerprint."""
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
