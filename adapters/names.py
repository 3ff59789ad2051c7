"""Validation of every user-supplied name before it reaches a path, a key or a query.

Tenant, adapter and alias names share one grammar: ``^[a-z0-9][a-z0-9_-]{0,62}$``.
The check is on the exact string (no normalisation), so look-alike unicode, ``..``,
slashes, whitespace and the empty string are all rejected.
"""

from __future__ import annotations

import re

from adapters.errors import InvalidNameError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


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
