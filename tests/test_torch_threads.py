"""``on_fresh_thread``: one-off work on a thread that is gone (with its OpenMP pool) when it returns."""

from __future__ import annotations

import threading

import pytest
import torch

from adapters.runtime.torch_threads import on_fresh_thread


def test_returns_the_value_computed_on_another_thread_that_has_exited() -> None:
    seen: list[threading.Thread] = []

    def work(a: torch.Tensor, *, scale: float) -> torch.Tensor:
        seen.append(threading.current_thread())
        return a * scale

    out = on_fresh_thread(work, torch.arange(4.0), scale=2.0)
    assert torch.equal(out, torch.tensor([0.0, 2.0, 4.0, 6.0]))
    assert seen and seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_reraises_what_the_work_raised_on_the_callers_thread() -> None:
    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        on_fresh_thread(fail)


def test_one_thread_makes_the_block_single_threaded_then_restores() -> None:
    from adapters.runtime.torch_threads import one_thread

    def inside_and_after(n: int) -> tuple[int, int]:
        torch.set_num_threads(n)
        with one_thread():
            inside = torch.get_num_threads()
        return inside, torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        assert on_fresh_thread(inside_and_after, 2) == (1, 2)
        assert on_fresh_thread(inside_and_after, 1) == (1, 1)
    finally:
        torch.set_num_threads(before)
