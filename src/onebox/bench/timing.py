"""Phase timing on any device: CUDA events on GPU, the host clock (after a sync) elsewhere."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from onebox.device import synchronize


class PhaseClock:
    """Marks points in a stream of device work and measures milliseconds between them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A point in time, recorded without waiting for the device on CUDA."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (call after the work has finished)."""
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1000.0

    def finish(self) -> None:
        """Wait for all marked work."""
        synchronize(self.device)


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)
