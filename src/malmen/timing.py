"""Wall-clock timing of work that may run asynchronously on an accelerator.

CUDA kernels return before they finish, so a clock read without synchronising measures the
launches, not the work.  Every timing of model work goes through ``timed``.

    with timed(device) as t:
        editor.edit(facts)
    print(t.seconds)
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` and, for a GPU, on every other visible GPU: a model
    spread over several (a device map) works on all of them (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


@dataclass
class Timing:
    seconds: float = float("nan")


@contextmanager
def timed(device: torch.device | str | None) -> Iterator[Timing]:
    """Seconds of the work done inside the block, on ``device``, synchronised at both ends."""
    result = Timing()
    synchronize(device)
    start = time.perf_counter()
    yield result
    synchronize(device)
    result.seconds = time.perf_counter() - start
