"""``one_thread``: a module-scoped, autouse fixture that runs a test module's torch work on one
thread (a tiny model needs one core; on a busy 2-core box two threads mostly wait for each
other). Import it into a test module to use it there."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
