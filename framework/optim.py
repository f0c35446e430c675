"""Optimizers and learning-rate schedules, by name.

Every entry returns a `Stepper` with the same small interface, so the train loop does not
care whether the schedule lives in a LambdaLR (Adam) or inside the optimizer (schedule-free).
`weights_for_eval()` gives the parameters to evaluate and export: schedule-free methods
evaluate at their averaged point, not at the point where gradients are taken.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

from framework.config import TrainConfig
from framework.registry import Registry

OPTIMIZERS: Registry[Callable[..., "Stepper"]] = Registry("optimizer")

# lr at 2^14 latents; scaled by 1/sqrt(n_latents / 2^14) (Gao et al. 2024)
DEFAULT_LR = {"adam": 2e-4, "signsgd_schedulefree": 5e-3}


def default_lr(optimizer: str, n_latents: int) -> float:
    return DEFAULT_LR[optimizer] / math.sqrt(n_latents / 2**14)


def warmup_decay(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Multiplier: linear warmup over `warmup` steps, linear decay to 0 over the last
    `decay_fraction` of `total` steps, 1 in between."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


class Stepper:
    def __init__(self, optimizer, scheduler=None):
        self.optimizer, self.scheduler = optimizer, scheduler

    def step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @contextmanager
    def weights_for_eval(self):
        yield

    def state_dict(self) -> dict:
        out = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, cfg: TrainConfig, total_steps: int) -> Stepper:
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_decay(s, total_steps, cfg.warmup_steps, cfg.decay_fraction))
    return Stepper(opt, sched)


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad): scale-free steps, robust to the wide gradient range of SAEs."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class ScheduleFreeStepper(Stepper):
    @contextmanager
    def weights_for_eval(self):
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


@OPTIMIZERS.register("signsgd_schedulefree")
def _signsgd_schedulefree(params, lr: float, cfg: TrainConfig, total_steps: int) -> Stepper:
    from schedulefree import ScheduleFreeWrapper  # noqa: PLC0415

    opt = ScheduleFreeWrapper(SignSGD(params, lr=lr), momentum=0.95)
    opt.train()
    return ScheduleFreeStepper(opt)
