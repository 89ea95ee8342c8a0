"""One torch thread for these tiny models: on a shared 2-core machine, the second thread's
synchronisation costs more than it brings (a 64-wide linear layer took 30 ms with two)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
