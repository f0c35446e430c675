"""Optimizers and learning-rate schedules, by name.

Every entry returns (optimizer, scheduler or None); the engine's Runner steps both. Schedule-
free methods keep their schedule inside the optimizer and expose train()/eval() to switch to
their averaged weights for evaluation and export (Runner.weights_for_eval).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from framework.schema import TrainConfig
from framework.registry import Registry

OPTIMIZERS: Registry[Callable[..., tuple]] = Registry("optimizer")
# capabilities of the registered optimizers
EVAL_WEIGHTS = {"signsgd_schedulefree"}  # evaluate at averaged weights: optimizer.eval() / .train()
ZERO_COMPATIBLE = {"adam"}  # torch optimizers DeepSpeed ZeRO can partition

# lr at 2^14 latents; scaled by 1/sqrt(n_latents / 2^14) (Gao et al. 2024's rule, kept: not
# re-measured across widths).
#
# Values chosen by `python -m framework.benchmarks.optimizer_study`: held-out FVU after a fixed
# token budget on synthetic activations with a known dictionary (d=256, 768 true features,
# true L0 ~24 varying per token, 10% bidirectional, 32 parents x 4 children, ~2% noise), TopK
# n_latents=4096, k=32, batch 1024, AuxK after 50k silent tokens; lr below is at 2^14 latents
# (x2 at 4096). "dead" = never fired on 32k eval tokens (4096 latents for 768 features, so
# some dead latents are expected). ± = two seeds.
#
#   budget  optimizer   lr@2^14   FVU            dead   features recovered (cos>0.9)
#   300k    adam        2e-4      0.449          0.00   0.00   <- old default
#   300k    adam        1e-3      0.323±0.003    0.00   0.06
#   300k    adam        2e-3      0.202±0.001    0.00   0.33   <- new default
#   300k    adam        4e-3      0.149±0.002    0.08   0.56   (best at 300k)
#   300k    adam        8e-3      0.166±0.003    0.32   0.52
#   300k    signsgd_sf  2e-3      0.335          0.00   0.05
#   300k    signsgd_sf  5e-3      0.229±0.007    0.40   0.33   (best signsgd_sf at 300k)
#   300k    signsgd_sf  1e-2      0.270          0.67   0.34
#   2M      adam        2e-4      0.174          0.00   0.39   <- old default
#   2M      adam        1e-3      0.110          0.11   0.75
#   2M      adam        2e-3      0.107          0.19   0.80   <- new default (best at 2M)
#   2M      adam        4e-3      0.110          0.63   0.77
#   2M      adam        8e-3      0.133          0.78   0.67
#   2M      signsgd_sf  1e-3      0.144          0.22   0.62
#   2M      signsgd_sf  2e-3      0.142          0.56   0.67   (best signsgd_sf at 2M)
#   2M      signsgd_sf  5e-3      0.195          0.72   0.62   <- old signsgd_sf default
#   2M      signsgd_sf  1e-2      0.423          0.76   0.55
#
# Adam stays the default optimizer: it beats schedule-free signSGD at both budgets (0.149 vs
# 0.229 at 300k, 0.107 vs 0.142 at 2M) and ZeRO strategies accept only Adam. Adam's 2e-4 was
# 1.6x (2M) to 2.2x (300k) worse in FVU than the best value. The optimum falls as the budget
# grows (4e-3 at 300k, 2e-3 at 2M) and real runs are far longer than 2M tokens, so the default
# is the long-budget optimum, 2e-3: 2x below the point where latents start to die in bulk (4e-3
# at 2M: 63% dead) and 4x below where FVU degrades at both budgets (8e-3). For
# signsgd_schedulefree the same reasoning gives 2e-3 (5e-3 killed 72% of latents at 2M).
# Caveats: synthetic data, one width (the 1/sqrt rule is assumed, not tested), at most 2M tokens.
DEFAULT_LR = {"adam": 2e-3, "signsgd_schedulefree": 2e-3}


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


def adam(params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Adam:
    """torch's fused Adam: one in-place pass per parameter. The default (for-each / single
    tensor) path makes two parameter-sized temporaries (sqrt(v) / bias correction), which at
    n=262144, d=512 is 1 GiB above params + grads + moments and ~9x slower on CPU."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, cfg: TrainConfig, total_steps: int):
    opt = adam(params, lr, tuple(cfg.adam_betas), cfg.adam_eps)
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
