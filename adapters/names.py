"""Validation of every user-supplied name before it reaches a path, a key or a query.

Tenant, adapter and alias names share one grammar: ``^[a-z0-9][a-z0-9_-]{0,62}$``.
The check is on the exact string (no normalisation), so look-alike unicode, ``..``,
slashes, whitespace and the empty string are all rejected.

Store keys have their own grammar (``validate_key``/``validate_prefix``): ``/``-joined segments
of ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, at most 512 characters; the registry checks keys with
it without importing any store.
"""

from __future__ import annotations

import re

from adapters.errors import InvalidNameError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_KEY_LENGTH = 512
SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(value: object, what: str = "name") -> str:
    """Return ``value`` unchanged if it is a valid name, else raise InvalidNameError."""
    if not isinstance(value, str):
        raise InvalidNameError(f"{what} must be a string, got {type(value).__name__}", param=what)
    if not NAME_PATTERN.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidNameError(
            f"invalid {what} {shown!r}: use 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit",
            param=what,
        )
    return value


def parse_ref(ref: object) -> tuple[str, int | str | None]:
    """Split an adapter reference: ``"name"``, ``"name@3"`` (version) or ``"name@prod"`` (alias).

    Returns ``(name, None)`` for a bare name (the caller resolves it to ``prod``), an int for a
    version, or the alias name.
    """
    if not isinstance(ref, str):
        raise InvalidNameError(f"adapter must be a string, got {type(ref).__name__}", param="adapter")
    name, sep, selector = ref.partition("@")
    validate_name(name, "adapter")
    if not sep:
        return name, None
    if selector.isascii() and selector.isdigit():
        version = int(selector)
        if not 1 <= version < 2**31:
            raise InvalidNameError(f"version in {ref!r} must be a positive integer", param="adapter")
        return name, version
    return name, validate_name(selector, "alias")


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def validate_key(key: object) -> str:
    """Return ``key`` unchanged if it is a valid store key, else raise InvalidNameError."""
    if not isinstance(key, str):
        raise InvalidNameError(f"store key must be a string, got {type(key).__name__}", param="key")
    if not key:
        raise InvalidNameError("store key must not be empty", param="key")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidNameError(
            f"store key {_shown(key)} is {len(key)} characters; the limit is {MAX_KEY_LENGTH}",
            param="key",
        )
    for segment in key.split("/"):
        # fullmatch, not match+$: '$' would accept a trailing newline.
        if not SEGMENT_PATTERN.fullmatch(segment):
            raise InvalidNameError(
                f"invalid store key {_shown(key)}: segment {_shown(segment)} must be 1-128 "
                "characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or "
                "digit (no empty segments, no leading or trailing '/')",
                param="key",
            )
    return key


def validate_prefix(prefix: object) -> str:
    """Return the normalised prefix: ``""`` or a valid key followed by ``/``."""
    if not isinstance(prefix, str):
        raise InvalidNameError(
            f"store prefix must be a string, got {type(prefix).__name__}", param="prefix"
        )
    if prefix == "":
        return ""
    stem = prefix[:-1] if prefix.endswith("/") else prefix
    try:
        validate_key(stem)
    except InvalidNameError as exc:
        raise InvalidNameError(
            f"invalid store prefix {_shown(prefix)}: {exc.message}", param="prefix"
        ) from None
    return stem + "/"
