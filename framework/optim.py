"""Optimizers and learning-rate schedules, by name.

Every entry returns (optimizer, scheduler or None); the engine's Runner steps both. Schedule-
free methods keep their schedule inside the optimizer and expose train()/eval() to switch to
their averaged weights for evaluation and export (Runner.weights_for_eval).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from framework.config import TrainConfig
from framework.registry import Registry

OPTIMIZERS: Registry[Callable[..., tuple]] = Registry("optimizer")

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


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, cfg: TrainConfig, total_steps: int):
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_decay(s, total_steps, cfg.warmup_steps, cfg.decay_fraction))
    return opt, sched


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


@OPTIMIZERS.register("signsgd_schedulefree")
def _signsgd_schedulefree(params, lr: float, cfg: TrainConfig, total_steps: int):
    from schedulefree import ScheduleFreeWrapper  # noqa: PLC0415

    opt = ScheduleFreeWrapper(SignSGD(params, lr=lr), momentum=0.95)
    opt.train()
    return opt, None
