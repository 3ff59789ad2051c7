"""Strict reading of a JSON object into a dataclass's fields (quotas, hyper-parameters).

``known_items(d, cls, ...)`` yields the object's items in order and refuses, with the caller's
error class: anything but an object (``"<what> must be an object"``, param ``what``; ``None``
reads as empty) and a key that is not a field of ``cls`` (``"unknown <noun> '<key>'; known:
..."``, param ``<what>.<key>``). A key is shown through ``ascii`` and cut to 80 characters, so
no control character or lone surrogate reaches a message. Two details differ by caller, as they
always have: the order the known keys are listed in (``sort_known``), and whether a key that is
not short printable ASCII still goes into ``param`` (``any_key_in_param``: the HTTP layer
escapes it there) or leaves ``param`` at ``what``. ``is_number`` and ``is_whole`` are the
checks a numeric field starts with: a JSON boolean is not a number, NaN and the infinities are
not whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from adapters.errors import TailorError


def known_items(d: Any, cls: type, *, what: str, noun: str, error: type[TailorError],
                sort_known: bool = False, any_key_in_param: bool = False) -> Iterator[tuple[str, Any]]:
    """``d``'s items, each checked to name a field of the dataclass ``cls`` as it is reached."""
    if d is None:
        return
    if not isinstance(d, dict):
        raise error(f"{what} must be an object", param=what)
    known = [f.name for f in fields(cls)]
    for key, value in d.items():
        if key not in known:
            listed = sorted(known) if sort_known else known
            param = f"{what}.{key}" if any_key_in_param else _param(what, key)
            raise error(f"unknown {noun} {ascii(key)[:80]}; known: {', '.join(listed)}", param=param)
        yield key, value


def is_number(value: Any) -> bool:
    """An int or a float (possibly NaN or infinite), never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value: Any) -> bool:
    """A number with no fraction: ``3`` or ``3.0``, not ``2.5``, NaN or an infinity."""
    return is_number(value) and (isinstance(value, int) or value.is_integer())


def _param(what: str, key: Any) -> str:
    text = str(key)
    return f"{what}.{text}" if text.isprintable() and text.isascii() and len(text) <= 64 else what
