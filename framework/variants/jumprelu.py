"""JumpReLU SAEs and transcoders (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

    a_j = pre_j * H(pre_j - theta_j),   theta_j = exp(log_threshold_j) > 0 (one per latent)
    loss = FVU + aux + lambda * S,      S = mean_b sum_j H(pre_bj - theta_j)     (sparsity: step, an L0)
                                          or mean_b sum_j tanh(c * a_bj)         (sparsity: tanh)

H (the step) has a zero derivative almost everywhere, so theta learns through the papers'
kernel-density pseudo-derivatives, a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
    d a_j / d theta_j := -(theta_j / eps) K((pre_j - theta_j) / eps)
    d H_j / d theta_j := -(1 / eps)       K((pre_j - theta_j) / eps)
pre gets a's ordinary derivative (1 where active) and none through H, unless `ste_to_input`
(Anthropic's variant) also passes the kernel term to pre (hence to the encoder).

lambda is either fixed (`l0_coef`) or driven to a requested L0 (`target_l0`, default the
config's `k`, so `k` means the same for JumpReLU as for TopK) by a PI controller in log space:
after each optimizer step, with e = clip(log(L0 / target), -1, 1) and L0 the global batch's (the
same on every rank, so replicas agree),
    I += controller_rate * e,     log lambda = log coef_init + I + controller_gain * e.
The proportional term reacts at once (the thresholds follow lambda only at the optimizer's
pace, so a pure integral overshoots); I and log lambda are buffers, so checkpoints carry them.
Setting both l0_coef and target_l0 is a config error.

Fused-kernel training forward (nothing of size B x n is stored): the kernel selects every
pre > theta - eps/2 by shifting its bias (`select_above`, width doubled until exact). Those
candidates hold both the active entries (pre > theta) and every entry inside the kernel's
window |pre - theta| < eps/2, which is all the pseudo-derivatives need; candidates below theta
are decoded with value 0, so the decoder's backward supplies dL/da_j for them too. Inference
(`eval()`) selects pre > theta only and exports as SAELens `jumprelu` (`jumprelu_transcoder`,
`jumprelu_skip_transcoder`) with `threshold` in raw units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from framework.registry import Registry
from framework.sae import SAE_KINDS, SAEOutput, TopKSAE
from framework.variants.common import (
    batch_topk_select,
    compact,
    default_width,
    require,
    select_above,
    threshold_select,
)

_ZERO = 0.0


class _JumpReLU(torch.autograd.Function):
    """a = pre * [pre > theta] on kept candidates; pseudo-derivative for theta (see module doc)."""

    @staticmethod
    def forward(ctx, pre, theta, keep, bandwidth: float, ste_to_input: bool):
        active = keep & (pre > theta)
        window = keep & ((pre - theta).abs() < bandwidth / 2)
        ctx.save_for_backward(theta, active, window)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return torch.where(active, pre, _ZERO)

    @staticmethod
    def backward(ctx, grad):
        theta, active, window = ctx.saved_tensors
        ste = torch.where(window, (theta / ctx.bandwidth) * grad, _ZERO)
        grad_pre = torch.where(active, grad, _ZERO)
        return (grad_pre + ste if ctx.ste_to_input else grad_pre), -ste, None, None, None


class _Step(torch.autograd.Function):
    """H(pre - theta) on kept candidates; d/dtheta = -(1/eps) K(...), d/dpre = 0 (or +(1/eps) K)."""

    @staticmethod
    def forward(ctx, pre, theta, keep, bandwidth: float, ste_to_input: bool):
        ctx.save_for_backward(keep & ((pre - theta).abs() < bandwidth / 2))
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (keep & (pre > theta)).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        (window,) = ctx.saved_tensors
        ste = torch.where(window, grad / ctx.bandwidth, _ZERO)
        return (ste if ctx.ste_to_input else None), -ste, None, None, None


# sparsity mode -> per-token penalty from (options, pre, theta, keep, values) over the candidates
SPARSITY: Registry = Registry("JumpReLU sparsity mode")


@SPARSITY.register("step")
def _step_penalty(o, pre, theta, keep, values):
    return _Step.apply(pre, theta, keep, o.bandwidth, o.ste_to_input).sum(1)


@SPARSITY.register("tanh")
def _tanh_penalty(o, pre, theta, keep, values):
    return torch.tanh(o.tanh_scale * values).sum(1)  # decoder rows have unit norm


@dataclass
class JumpReLUOptions:
    # initial threshold (normalised units); 0 = from the init sample: the threshold at which its
    # L0 is the target (target_l0, else k); without a sample (no init_from_sample) 1.0
    threshold_init: float = 0.0
    bandwidth: float = 0.05  # eps of the rectangle kernel, normalised units (inputs have E||x||^2 = d_in)
    sparsity: str = "step"  # step: the L0 itself | tanh: sum tanh(tanh_scale * a)
    tanh_scale: float = 4.0
    l0_coef: float = 0.0  # > 0: a fixed sparsity coefficient lambda (no controller) ...
    target_l0: float = 0.0  # ... else lambda adapts to reach this L0; 0 = the config's k
    coef_init: float = 0.0  # lambda at the start with the controller; 0 = 0.1 / target (lambda * L0 ~ 0.1 there)
    controller_rate: float = 0.02  # integral gain per step (see the module docstring)
    controller_gain: float = 1.0  # proportional gain
    coef_warmup_steps: int = 0  # lambda ramps linearly from 0 over these steps (the controller waits)
    ste_to_input: bool = False  # also pass the kernel term to pre (Anthropic); False = DeepMind
    # log theta = threshold_lr_scale * log_threshold: Adam moves a parameter by ~lr per step, so
    # the thresholds move by ~scale * lr in log space per step (1 = Gemma Scope's parameterisation)
    threshold_lr_scale: float = 1.0
    candidate_factor: int = 4  # the kernel's first width: factor * the target L0, widened as needed
    encoder_init_scale: float = 0.0  # encoder rows start at this norm; 0 = min(1, sqrt(d_in / n_latents))

    def __post_init__(self):
        require(self.threshold_init >= 0 and math.isfinite(self.threshold_init),
                f"options.threshold_init: must be a finite value >= 0 (0 = from the data), got {self.threshold_init}")
        require(self.bandwidth > 0 and math.isfinite(self.bandwidth),
                f"options.bandwidth: must be a finite value > 0, got {self.bandwidth}")
        require(self.sparsity in SPARSITY, f"options.sparsity: '{self.sparsity}' is not one of {sorted(SPARSITY)}")
        require(self.tanh_scale > 0, "options.tanh_scale: must be > 0")
        require(self.l0_coef >= 0 and self.target_l0 >= 0, "options.l0_coef / options.target_l0: must be >= 0")
        require(not (self.l0_coef > 0 and self.target_l0 > 0),
                "options.l0_coef / options.target_l0: give one: a fixed sparsity coefficient (l0_coef) or an L0 "
                "for the controller to reach (target_l0), not both")
        require(self.coef_init >= 0, "options.coef_init: must be >= 0 (0 = 0.1 / the target L0)")
        require(self.controller_rate > 0, "options.controller_rate: must be > 0")
        require(self.controller_gain >= 0, "options.controller_gain: must be >= 0")
        require(self.coef_warmup_steps >= 0, "options.coef_warmup_steps: must be >= 0")
        require(self.candidate_factor >= 1, "options.candidate_factor: must be >= 1")
        require(self.threshold_lr_scale > 0 and math.isfinite(self.threshold_lr_scale),
                "options.threshold_lr_scale: must be a finite value > 0")
        require(self.encoder_init_scale >= 0, "options.encoder_init_scale: must be >= 0")


class JumpReLUThresholds:
    """Per-latent learned thresholds, their training selection and the L0 controller (module
    docstring), for any layout whose encoder rows are latents: JumpReLUSAE here, the JumpReLU
    cross-layer transcoder (framework/variants/clt.py). The host calls `_init_thresholds` and
    may override `target_l0` (the L0 the controller steers the global batch to)."""

    variable_l0 = True

    def _init_thresholds(self, n_latents: int) -> None:
        o = self.options
        self.log_threshold = nn.Parameter(torch.full((n_latents,), self._param_of(o.threshold_init or 1.0)))
        self.log_coef_init = math.log(o.l0_coef or o.coef_init or 0.1 / self.target_l0())
        self.register_buffer("log_coef", torch.tensor(self.log_coef_init))  # log lambda
        self.register_buffer("coef_integral", torch.zeros(()))  # the controller's I
        self.register_buffer("coef_steps", torch.zeros((), dtype=torch.long))  # optimizer steps seen
        # the kernel width the last training batch needed (x1.5): usually no re-run. A buffer, so a
        # resumed run uses the widths (and so the summation orders) of the uninterrupted one; per
        # rank (DDP broadcasts rank 0's at each forward; under ZeRO a resumed rank > 0 starts from
        # rank 0's, which may change the rounding of its first steps)
        self.register_buffer("width_hint", torch.zeros((), dtype=torch.long))

    def _scale_encoder_rows(self, rows: slice, d_in: int, n_latents: int) -> None:
        """A threshold rule lets high-norm tokens take many latents; with unit-norm encoder rows
        their first reconstructions overshoot (as for BatchTopK, see the variants README)."""
        scale = self.options.encoder_init_scale or min(1.0, (d_in / n_latents) ** 0.5)
        with torch.no_grad():
            w = self.encoder_weight[rows]
            w.mul_(scale / w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -- state ----------------------------------------------------------------------------
    def threshold(self) -> torch.Tensor:
        return (self.options.threshold_lr_scale * self.log_threshold).exp()

    def _param_of(self, theta):
        """The parameter value for threshold(s) theta (float or tensor)."""
        log = torch.log(theta) if torch.is_tensor(theta) else math.log(theta)
        return log / self.options.threshold_lr_scale

    def coefficient(self) -> torch.Tensor:
        """lambda now (a 0-d tensor: no host sync), with the warm-up ramp."""
        warm = self.options.coef_warmup_steps
        ramp = ((self.coef_steps.float() + 1) / warm).clamp(max=1.0) if warm else 1.0
        return self.log_coef.exp() * ramp

    def target_l0(self) -> float:
        """The L0 the controller steers to (0 with a fixed coefficient)."""
        o = self.options
        return 0.0 if o.l0_coef > 0 else (o.target_l0 or float(self.k))

    def _start_width(self, per_token: float, n_latents: int) -> int:
        base = default_width(math.ceil(per_token or self.k), self.options.candidate_factor, n_latents)
        return max(base, int(self.width_hint))

    # -- math -------------------------------------------------------------------------------
    def _training_codes(self, x, weight, bias, offset, theta, width: int):
        """The training selection over these encoder rows: (values [B, w'], their row ids, the
        per-token sparsity penalty, the width the next batch should start at)."""
        o = self.options
        cut = theta.detach() - o.bandwidth / 2
        shifted, idx, keep = select_above(x, weight, bias, offset, cut, width)
        pre = shifted + cut[idx]  # the pre-activations, differentiable through the kernel's kept entries
        th = theta[idx]
        values = _JumpReLU.apply(pre, th, keep, o.bandwidth, o.ste_to_input)
        packed, packed_idx = compact(values, idx, keep)
        penalty = SPARSITY[o.sparsity](o, pre, th, keep, values)
        return packed, packed_idx, penalty, min(weight.shape[0], packed.shape[1] * 3 // 2 + 1)

    def _with_penalty(self, out: SAEOutput, penalty: torch.Tensor, next_width: int, batch) -> SAEOutput:
        """A training output with its sparsity loss (penalty: per token); the next batch's width."""
        self.width_hint.fill_(next_width)
        out.losses["l0"] = self.coefficient() * batch.mean(penalty)
        return out

    @torch.no_grad()
    def after_global_step(self, l0: torch.Tensor) -> None:
        o = self.options
        self.coef_steps += 1
        target = self.target_l0()
        if target > 0 and int(self.coef_steps) > o.coef_warmup_steps:
            err = torch.log(l0.to(self.log_coef).clamp_min(1e-6) / target).clamp(-1.0, 1.0)
            self.coef_integral += o.controller_rate * err
            self.log_coef.copy_(self.log_coef_init + self.coef_integral + o.controller_gain * err)

    @torch.no_grad()
    def _init_threshold_rows(self, xn: torch.Tensor, rows: slice, per_token: float, offset: torch.Tensor) -> None:
        """Thresholds of `rows` at which the (normalised) sample `xn` fires `per_token` of them
        per token on average: the smallest value a batch top-k of that size selects."""
        per_token = max(1, round(per_token))
        weight = self.encoder_weight[rows]
        values, _ = batch_topk_select(xn, weight, self.encoder_bias[rows], offset, per_token,
                                      default_width(per_token, self.options.candidate_factor, weight.shape[0]))
        chosen = values[values > 0]
        if chosen.numel():
            self.log_threshold[rows] = self._param_of(chosen.min().item())


@SAE_KINDS.register("jumprelu")
class JumpReLUSAE(JumpReLUThresholds, TopKSAE):
    """Per-latent learned thresholds, trained with pseudo-derivatives and an L0 penalty."""

    Options = JumpReLUOptions
    export_architecture = "jumprelu"

    def __init__(self, d_in, n_latents, k, d_out=None, seed=0, options=None):
        super().__init__(d_in, n_latents, k, d_out=d_out, seed=seed, options=options)
        self._scale_encoder_rows(slice(None), d_in, n_latents)
        self._init_thresholds(n_latents)

    def forward(self, x: torch.Tensor, k: int | None = None, batch=None) -> SAEOutput:
        theta = self.threshold()
        width = self._start_width(self.target_l0(), self.n_latents)
        if not self.training:
            values, indices = threshold_select(x, self.encoder_weight, self.encoder_bias, self.input_offset(),
                                               theta.detach(), width)
            return SAEOutput(self.decode(values, indices), values, indices)
        values, indices, penalty, next_width = self._training_codes(x, self.encoder_weight, self.encoder_bias,
                                                                    self.input_offset(), theta, width)
        return self._with_penalty(SAEOutput(self.decode(values, indices), values, indices), penalty, next_width,
                                  self.training_batch(x, batch))

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, normalize: bool, b_dec_init: str) -> None:
        super().init_from_sample(x, y, normalize, b_dec_init)
        if self.options.threshold_init == 0:
            xn = self.normalize_input(x.to(self.encoder_weight))
            self._init_threshold_rows(xn, slice(None), self.target_l0() or self.k, self.input_offset())

    # -- export -------------------------------------------------------------------------------
    def export_extra(self, input_scale: float, output_scale: float) -> dict[str, torch.Tensor]:
        # pre-activations of the folded export are pre / output_scale, and so is the threshold
        return {"threshold": self.threshold().detach().float() / output_scale}

    def load_export_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        self.log_threshold.copy_(self._param_of(tensors.pop("threshold").to(self.log_threshold)))
