"""What a text input must be before it may join a batch shared with other tenants.

The tokenizer (Rust) refuses strings that are not sequences of Unicode scalar values, e.g. a
lone UTF-16 surrogate ``"\\ud800"`` that JSON can carry; if such a row reached a merged forward
pass it would fail every request in it. ``check_texts`` refuses such rows up front, naming the
row, so they fail only their own request. It is cheap: ASCII texts are accepted without
encoding them.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.errors import InvalidInputError


def check_text(text: str, param: str = "input") -> None:
    """Raise ``InvalidInputError`` unless ``text`` is a str of Unicode scalar values."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{param} must be a string, not {type(text).__name__}", param=param)
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        raise InvalidInputError(
            f"{param} is not valid Unicode text: lone surrogate U+{bad:04X} at character {e.start} "
            "(encode text as UTF-8; surrogates may appear in JSON only as valid pairs)",
            param=param) from None


def check_texts(texts: Sequence[str], param: str = "inputs") -> None:
    """``check_text`` for every row; the error names the first bad row (``inputs[i]``)."""
    for i, text in enumerate(texts):
        check_text(text, f"{param}[{i}]")
