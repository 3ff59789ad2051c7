"""Token ids -> text, incrementally, with stop sequences matched on the text.

Contract: ``TextAssembler(tokenizer, stop)`` is fed one generated token id at a time (``add``)
and returns the text that may be shown now:

* Only valid, final text is returned: a token that ends inside a multi-byte UTF-8 character
  (the tokenizer decodes it as U+FFFD) is held until the character completes; text is decoded
  over a short window of previous tokens so tokenizers that merge spaces across tokens give the
  same text as decoding everything at once. Special tokens are skipped.
* Stop strings are matched on the decoded text, across token boundaries, and never shown: text
  that could still be the start of a stop string is held back; when one appears, the text
  before it is returned and ``stopped`` becomes True (nothing after it is ever shown).
* ``flush()`` returns what was held back once the sequence ends for another reason (its length,
  an end-of-sequence token): held text that did not become a stop string is shown.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextAssembler:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were decoded already (the context window)
        self._read = 0
        self._held = ""  # decoded but not shown: may be the start of a stop string
        self.stopped = False
        self.text = ""  # everything shown so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; the text to show now ("" when nothing is final yet)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new, or an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self.ids)
        self._held += after[len(before):]
        return self._release()

    def _release(self) -> str:
        held = self._held
        first = min(((held.find(s), s) for s in self.stop if s in held), default=None)
        if first is not None:
            self.stopped = True
            self._held = ""
            return self._show(held[: first[0]])
        keep = 0  # the longest tail of held text that starts some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:n]):
                    keep = n
                    break
        self._held = held[len(held) - keep:] if keep else ""
        return self._show(held[: len(held) - keep])

    def _show(self, text: str) -> str:
        self.text += text
        return text

    def flush(self) -> str:
        """The held-back text, at the end of a sequence that did not stop on a stop string."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return self._show(held)
