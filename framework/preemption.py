"""Preemption: SIGTERM / SIGUSR1 ask the run to stop at the next step boundary, checkpoint and
exit with PREEMPTED_EXIT_CODE, which launch scripts and SLURM jobs treat as "requeue me".

SLURM sends SIGUSR1 ahead of a time limit with `--signal=USR1@<seconds>` and SIGTERM on
preemption. The flag is reduced across ranks (max) at every step, so a signal that reaches one
rank stops all of them at the same step.
"""

from __future__ import annotations

import signal

import torch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: temporary failure, try again (requeue)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the train loop after the preemption checkpoint is written."""


class PreemptionFlag:
    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker thread)
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def should_stop(self, engine) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=engine.device)
        if engine.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
