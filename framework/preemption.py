"""Preemption: SIGTERM / SIGUSR1 ask the run to stop at the next step boundary, checkpoint and
exit with PREEMPTED_EXIT_CODE, which launch scripts and SLURM jobs treat as "requeue me".

SLURM sends SIGUSR1 ahead of a time limit with `--signal=USR1@<seconds>` and SIGTERM on
preemption. The flag is reduced across ranks (max) at every step, so a signal that reaches one
rank stops all of them at the same step.

A rank that does not reach a step boundary within the grace period after the signal
(`dist.timeout_s`: it is blocked, e.g. in a collective whose peer is gone or in a stalled read)
exits anyway with the same code, saying where it was, without a new checkpoint: the last one
is intact and a rerun resumes from it. Python runs signal handlers only between bytecodes, so
a main thread blocked in C++ never sees its own flag; the C-level handler also writes the
signal number to a wakeup fd (signal.set_wakeup_fd), which a watcher thread reads.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import torch

from framework import watchdog

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: temporary failure, try again (requeue)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the train loop after the preemption checkpoint is written."""


class PreemptionFlag:
    def __init__(self, grace_s: float = 0.0):
        """grace_s > 0: exit that long after a signal if no step boundary acted on it."""
        self.signal: int | None = None
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker thread)
                pass
        self._grace = _Grace(grace_s) if grace_s > 0 and self._previous else None

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def should_stop(self, engine) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=engine.device)
        if engine.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and self._grace is not None:
            self._grace.acted.set()  # the stop is under way; its save's waits are bounded themselves
        return stop

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._grace is not None:
            self._grace.close()


class _Grace:
    """Watches the wakeup fd for SIGNALS; `seconds` after the first, unless `acted` is set by
    then, prints where the main thread is and ends the process."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.acted = threading.Event()
        self._closed = False
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._main = threading.current_thread()
        self._thread = threading.Thread(target=self._run, name="sparsemill-stop-grace", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        numbers = {int(s) for s in SIGNALS}
        while not self._closed:
            received = set(self._read.recv(64)) & numbers
            if not received:
                continue
            if self.acted.wait(self.seconds) or self._closed:
                return
            name = signal.Signals(min(received)).name
            watchdog.say(f"stop requested by {name} {self.seconds:g} s ago (dist.timeout_s), but this rank has not "
                         f"reached a step boundary: it is {watchdog.describe_wait(watchdog.stack_frames(self._main))}. "
                         f"Exiting without a new checkpoint; rerun the same command to resume from the last one "
                         f"(exit code {PREEMPTED_EXIT_CODE}).")
            os._exit(PREEMPTED_EXIT_CODE)

    def close(self) -> None:
        self._closed = True
        self.acted.set()
        signal.set_wakeup_fd(self._previous_fd)
        try:
            self._write.send(b"\0")  # wakes the watcher's recv
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._read.close()
        self._write.close()
