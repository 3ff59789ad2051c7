"""What a caller of ``GenerationEngine.submit`` holds: a stream of text deltas.

Contract:

* ``TokenDelta(text, token_ids, finish_reason)``: the text that became final since the last
  delta (possibly "" on the last one) and the generated token ids it came from; the last delta of
  a finished sequence has ``finish_reason`` ``"stop"`` (an end-of-sequence token or a stop string)
  or ``"length"`` (``max_tokens``, or the base's context). Every other delta has None.
* ``GenerationStream`` is iterable synchronously (``for delta in stream``: blocks) and
  asynchronously (``async for delta in stream``: never blocks the event loop; the scheduler
  thread wakes it with ``call_soon_threadsafe``). One consumer per stream. Iteration ends after
  the finishing delta, or at once after ``cancel()`` (deltas the scheduler queued before it
  are dropped). An error inside the engine ends the
  iteration by raising it to the consumer.
* ``cancel()`` (a client that disconnected) is idempotent and cheap: the scheduler frees the
  sequence and its KV-cache rows at its next step; a cancelled stream never finishes.
* ``usage`` (``Usage(prompt_tokens, completion_tokens)``) is set once the sequence finished
  (None before; a cancelled stream keeps None). ``finish_reason`` likewise.
* ``text()`` (blocking) joins every delta: the whole completion.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_END = object()


class GenerationStream:
    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.usage: Usage | None = None
        self.finish_reason: FinishReason | None = None
        self._items: deque[object] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = threading.Event()
        self._closed = False

    # -- producer side (the scheduler thread) -----------------------------------------------

    def _push(self, item: object) -> None:
        with self._cond:
            if self._closed:
                return
            self._items.append(item)
            if item is _END or isinstance(item, BaseException) or (
                    isinstance(item, TokenDelta) and item.finish_reason is not None):
                self._closed = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def _emit(self, delta: TokenDelta) -> None:
        self._push(delta)

    def _finish(self, delta: TokenDelta, usage: Usage) -> None:
        self.usage = usage
        self.finish_reason = delta.finish_reason
        self._push(delta)

    def _fail(self, error: BaseException) -> None:
        self._push(error)

    def _end(self) -> None:
        self._push(_END)

    # -- consumer side -------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating: the sequence is freed at the scheduler's next step."""
        self._cancelled.set()
        self._end()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._closed

    def _take(self) -> object | None:
        if not self._items:
            return None
        return self._items.popleft()

    def __iter__(self) -> Iterator[TokenDelta]:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            if item is _END or self.cancelled:  # deltas queued before cancel() are not shown
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenDelta)
            yield item
            if item.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenDelta]:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                item = self._take()
                if item is None:
                    event = asyncio.Event()
                    self._waiters.append((loop, event))
            if item is None:
                await event.wait()
                continue
            if item is _END or self.cancelled:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenDelta)
            yield item
            if item.finish_reason is not None:
                return

    def text(self) -> str:
        """Every delta's text, joined (blocks until the stream ends)."""
        return "".join(d.text for d in self)
