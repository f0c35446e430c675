"""A trainer's own step time, so that each SAE's training rate and cost can be told apart when
several train from one LLM forward (summary.json `sae_training`). On a GPU the steps run
asynchronously, so host timers would measure kernel launches: CUDA events bracket each step
and are read at the next step or read-out (a step already ends with a host sync, so reading
them adds none). On a CPU, wall time."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps = 0
        self._seconds = 0.0
        self._pending: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    @contextmanager
    def timing(self):
        """Time one step."""
        self._settle()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending = (start, end)
        else:
            t = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t
        self.steps += 1

    def _settle(self) -> None:
        if self._pending is not None:
            start, end = self._pending
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
            self._pending = None

    @property
    def seconds(self) -> float:
        """Seconds of all timed steps."""
        self._settle()
        return self._seconds
