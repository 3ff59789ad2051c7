"""A training function that is stopped mid-run, for tests of resuming from checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any


def stopped_at_epoch(train: Callable[..., Any], epoch: int) -> Callable[..., Any]:
    """``train`` (called with ``callbacks=``), raising KeyboardInterrupt once ``epoch`` is reported:
    before that epoch's checkpoint is written, so epoch ``epoch - 1``'s is the last on disk."""
    def run(*a: Any, callbacks: Any, **kw: Any) -> Any:
        def on_epoch(e: int, metrics: dict[str, Any]) -> None:
            callbacks.on_epoch(e, metrics)
            if e == epoch:
                raise KeyboardInterrupt
        return train(*a, callbacks=replace(callbacks, on_epoch=on_epoch), **kw)
    return run
