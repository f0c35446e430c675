"""One SAE's training: the objective (normalised MSE + AuxK + the kind's own terms), the
decoder-norm constraint, optimizer/engine wrapping, dead-latent counters, and metric sums kept
on the device (read only when logged).

Data parallel exactness: each rank sees its slice of the global batch. The loss normalisers
(the batch's centred sum of squares) and the firing counts are summed over ranks, and each
rank's loss is its share of the global loss times the world size, so that the engine's
gradient averaging yields exactly the gradient of the global-batch loss.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from framework import optim
from framework.config import SAEConfig, TrainConfig
from framework.sae import SAEOutput, TopKSAE, build_sae


def centered_sum_sq(y: torch.Tensor, reduce) -> torch.Tensor:
    """sum ||y - mean(y)||^2 over the (global) batch; `reduce` sums a tensor over ranks."""
    y = y.detach().double()
    stats = torch.cat([y.sum(0), y.pow(2).sum().reshape(1), y.new_tensor([y.shape[0]])])
    stats = reduce(stats)
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    return (sq - total.pow(2).sum() / n.clamp_min(1)).clamp_min(1e-12).float()


def normalized_mse(x_hat: torch.Tensor, y: torch.Tensor, reduce=lambda t: t) -> torch.Tensor:
    """||y - x_hat||^2 / ||y - mean(y)||^2: this rank's share of the global batch's FVU."""
    return (x_hat - y).pow(2).sum() / centered_sum_sq(y, reduce)


def annealed_k(cfg: SAEConfig, step: int, total_steps: int) -> int:
    if not cfg.k_anneal_start:
        return cfg.k
    span = max(1, int(total_steps * cfg.k_anneal_fraction))
    frac = min(1.0, step / span)
    return max(cfg.k, round(cfg.k_anneal_start + (cfg.k - cfg.k_anneal_start) * frac))


@dataclass
class StepMetrics:
    """Per-step scalars as 0-d device tensors (global-batch values summed over ranks at read)."""

    loss: torch.Tensor
    fvu: torch.Tensor
    aux_loss: torch.Tensor
    l0: torch.Tensor
    grad_norm: torch.Tensor


class SAEObjective(nn.Module):
    """What the engine wraps (DDP / DeepSpeed): the SAE forward and its loss, so that every
    parameter use, AuxK's included, happens inside the wrapped forward."""

    def __init__(self, sae: TopKSAE, cfg: SAEConfig, aux_k: int, world: int, reduce):
        super().__init__()
        self.sae, self.cfg, self.aux_k, self.world, self.reduce = sae, cfg, aux_k, world, reduce
        # Project out each decoder row's radial gradient as the gradient is produced: linear, so
        # it commutes with the engine's averaging, and it runs before any ZeRO partitioning.
        sae.decoder_weight.register_hook(self._project_radial)

    def _project_radial(self, grad: torch.Tensor) -> torch.Tensor:
        w = self.sae.decoder_weight.detach()
        if w.shape != grad.shape:  # ZeRO-3 released the full weight: leave the gradient as is
            return grad
        return grad - (grad * w).sum(1, keepdim=True) * w

    def aux_loss(self, x: torch.Tensor, residual: torch.Tensor, dead_ids: torch.Tensor) -> torch.Tensor:
        """AuxK: the top aux_k dead latents predict the residual the live latents left, decoded
        WITHOUT b_dec, scaled by min(n_dead / aux_k, 1). Only the dead latents' encoder rows are
        multiplied (cost B*d*n_dead, not another full encoder pass)."""
        sae = self.sae
        k_aux = min(self.aux_k, dead_ids.numel())
        values, sub_idx = kernels.topk_encode(x, sae.encoder_weight[dead_ids], sae.encoder_bias[dead_ids],
                                              sae.input_offset(), k_aux, use_abs=sae.use_abs)
        e_hat = sae.decode(values, dead_ids[sub_idx], with_bias=False)
        scale = min(dead_ids.numel() / self.aux_k, 1.0)
        return scale * normalized_mse(e_hat, residual, self.reduce)

    def forward(self, x_raw: torch.Tensor, y_raw: torch.Tensor, k: int, dead_ids: torch.Tensor | None,
                autocast: bool = False):
        sae = self.sae
        x, y = sae.normalize_input(x_raw), sae.normalize_target(y_raw)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = sae(x, k)
            fvu = normalized_mse(out.x_hat.float(), y, self.reduce)
            aux = (self.aux_loss(x, (y - out.x_hat).detach().float(), dead_ids)
                   if dead_ids is not None and dead_ids.numel() else fvu.new_zeros(()))
            # a kind's extra terms are per-rank means: /world makes them shares of the global loss
            loss = fvu + self.cfg.aux_coef * aux + sum(out.losses.values(), fvu.new_zeros(())) / self.world
        # x world: the engine averages gradients over ranks; the global loss is their sum.
        return loss * self.world, fvu.detach(), aux.detach(), out


class SAETrainer:
    def __init__(self, cfg: SAEConfig, train_cfg: TrainConfig, input_site: str, output_site: str,
                 dims: dict[str, int], total_steps: int, device: torch.device, seed: int, engine=None):
        self.cfg, self.train_cfg, self.total_steps = cfg, train_cfg, total_steps
        self.input_site, self.output_site = input_site, output_site  # keys of the activation batches
        d_in = dims[input_site]
        d_out = dims[output_site] if output_site != input_site else None
        self.sae: TopKSAE = build_sae(cfg.kind, d_in, cfg.n_latents, cfg.k, d_out=d_out, seed=seed,
                                      options=cfg.options).to(device)
        self.world = engine.world if engine is not None and engine.world > 1 else 1
        self.reduce = engine.all_reduce_ if self.world > 1 else (lambda t: t)
        self.lr = cfg.lr or optim.default_lr(train_cfg.optimizer, cfg.n_latents)
        self.aux_k = cfg.aux_k or max(1, self.sae.d_in // 2)
        self.objective = SAEObjective(self.sae, cfg, self.aux_k, self.world, self.reduce)
        self.tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)  # since last histogram
        self.step_count = 0
        self.engine = engine
        self._runner = None
        self.reset_sums()

    @property
    def stepper(self):
        """The engine's runner (built lazily: after init_from_sample, before the first step)."""
        if self._runner is None:
            from framework.engine import Runner  # noqa: PLC0415

            opt, sched = optim.OPTIMIZERS[self.train_cfg.optimizer](
                list(self.sae.parameters()), self.lr, self.train_cfg, self.total_steps)
            wrap = self.engine.wrap if self.engine is not None else Runner
            self._runner = wrap(self.objective, opt, sched, self.train_cfg.grad_clip)
        return self._runner

    def reset_sums(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.sum_steps = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def step(self, x_raw: torch.Tensor, y_raw: torch.Tensor) -> StepMetrics:
        runner = self.stepper
        k = annealed_k(self.cfg, self.step_count, self.total_steps)
        # one host sync: how many latents are dead decides the AuxK work
        dead_ids = self.dead_mask().nonzero().squeeze(1) if self.cfg.aux_coef > 0 else None
        loss, fvu, aux, out = runner(x_raw, y_raw, k, dead_ids, self.train_cfg.autocast == "bfloat16")
        runner.backward(loss)
        grad_norm = runner.step()
        with runner.gathered(modify=True), torch.no_grad():
            self.sae.renorm_decoder()
            self.sae.after_step(out)
        global_tokens = self._count_firing(out, x_raw.shape[0])
        self.step_count += 1
        l0_share = (out.values != 0).sum().float() / global_tokens
        metrics = StepMetrics(loss.detach() / self.world, fvu, aux, l0_share, grad_norm.to(fvu.device) / self.world)
        for name, value in vars(metrics).items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.sum_steps += 1
        return metrics

    @torch.no_grad()
    def _count_firing(self, out: SAEOutput, n_tokens: int) -> int:
        """Firing counts of the global batch (one small all-reduce); returns its token count."""
        active = out.indices[out.values != 0]
        counts = torch.cat([torch.bincount(active, minlength=self.cfg.n_latents),
                            torch.tensor([n_tokens], device=active.device)])
        counts = self.reduce(counts)
        counts, global_tokens = counts[:-1], int(counts[-1])
        self.fire_counts += counts
        self.tokens_since_fired += global_tokens
        self.tokens_since_fired[counts > 0] = 0
        return global_tokens

    def read_sums(self) -> dict[str, float]:
        """Means since the last read (one all-reduce + one host sync), dead fraction and lr."""
        names = list(self.sums)
        values = self.reduce(torch.stack([self.sums[n].float() for n in names])) / max(1, self.sum_steps)
        out = dict(zip(names, values.tolist()))
        out["dead_frac"] = self.dead_mask().float().mean().item()
        out["lr"] = self.stepper.lr
        out["k"] = annealed_k(self.cfg, self.step_count, self.total_steps)
        self.reset_sums()
        return out

    def density_log10(self, tokens: int) -> torch.Tensor:
        """log10 firing density of each latent since the last call (for the histogram)."""
        density = self.fire_counts.double() / max(1, tokens)
        self.fire_counts.zero_()
        return torch.log10(density + 1e-10)

    def full_sae(self) -> TopKSAE:
        """The SAE with whole parameters: itself, or under ZeRO-3 a gathered copy."""
        runner = self.stepper
        if not hasattr(runner, "stage") or runner.stage < 3:
            return self.sae
        with runner.gathered():
            state = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        copy = build_sae(self.cfg.kind, self.sae.d_in, self.cfg.n_latents, self.cfg.k,
                         d_out=self.sae.d_out if self.sae.is_transcoder else None, options=self.cfg.options)
        copy.load_state_dict(state)
        return copy.to(self.tokens_since_fired.device)

    @contextmanager
    def evaluating(self):
        """Inference mode for eval/export: whole parameters, the module's eval() (kinds may
        select differently), and the optimizer's evaluation weights (schedule-free)."""
        with self.stepper.weights_for_eval():
            sae = self.full_sae()
            sae.eval()
            try:
                yield sae
            finally:
                sae.train()


def total_steps_for(train_cfg: TrainConfig) -> int:
    return max(1, math.ceil(train_cfg.total_tokens / train_cfg.batch_size))
