"""One SAE's training state and step: loss (normalised MSE + AuxK), decoder-norm constraint,
optimizer, dead-latent counters and metric sums kept on the device (read only when logged)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import kernels
from framework import optim
from framework.config import SAEConfig, TrainConfig
from framework.sae import TopKSAE, build_sae


def normalized_mse(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||y - x_hat||^2 / ||y - mean(y)||^2 over the batch: FVU of the batch."""
    return (x_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)


def annealed_k(cfg: SAEConfig, step: int, total_steps: int) -> int:
    if not cfg.k_anneal_start:
        return cfg.k
    span = max(1, int(total_steps * cfg.k_anneal_fraction))
    frac = min(1.0, step / span)
    return max(cfg.k, round(cfg.k_anneal_start + (cfg.k - cfg.k_anneal_start) * frac))


@dataclass
class StepMetrics:
    """Per-step scalars as 0-d device tensors: summing them costs no host sync."""

    loss: torch.Tensor
    fvu: torch.Tensor
    aux_loss: torch.Tensor
    l0: torch.Tensor
    grad_norm: torch.Tensor


class SAETrainer:
    def __init__(self, cfg: SAEConfig, train_cfg: TrainConfig, input_site: str, output_site: str,
                 dims: dict[str, int], total_steps: int, device: torch.device, seed: int):
        self.cfg, self.train_cfg, self.total_steps = cfg, train_cfg, total_steps
        self.input_site, self.output_site = input_site, output_site  # keys of the activation batches
        d_in = dims[input_site]
        d_out = dims[output_site] if output_site != input_site else None
        self.sae: TopKSAE = build_sae(cfg.kind, d_in, cfg.n_latents, cfg.k, d_out=d_out, seed=seed,
                                      options=cfg.options).to(device)
        self.lr = cfg.lr or optim.default_lr(train_cfg.optimizer, cfg.n_latents)
        self.stepper = optim.OPTIMIZERS[train_cfg.optimizer](list(self.sae.parameters()), self.lr, train_cfg, total_steps)
        self.aux_k = cfg.aux_k or max(1, self.sae.d_in // 2)
        self.tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)  # since last histogram
        self.step_count = 0
        self.reset_sums()

    def reset_sums(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.sum_steps = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

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
        return scale * normalized_mse(e_hat, residual)

    def step(self, x_raw: torch.Tensor, y_raw: torch.Tensor) -> StepMetrics:
        sae, tcfg = self.sae, self.train_cfg
        x, y = sae.normalize_input(x_raw), sae.normalize_target(y_raw)
        k = annealed_k(self.cfg, self.step_count, self.total_steps)
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=tcfg.autocast == "bfloat16")
        with autocast:
            out = sae(x, k)
            fvu = normalized_mse(out.x_hat.float(), y)
            # one host sync: how many latents are dead decides the AuxK work
            dead_ids = self.dead_mask().nonzero().squeeze(1) if self.cfg.aux_coef > 0 else None
            aux = (self.aux_loss(x, (y - out.x_hat).detach().float(), dead_ids)
                   if dead_ids is not None and dead_ids.numel() else fvu.new_zeros(()))
            loss = fvu + self.cfg.aux_coef * aux + sum(out.losses.values(), fvu.new_zeros(()))
        self.stepper.zero_grad()
        loss.backward()
        sae.project_decoder_grad()
        params = list(sae.parameters())
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip) if tcfg.grad_clip > 0
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.stepper.step()
        sae.renorm_decoder()
        with torch.no_grad():
            sae.after_step(out)
        self._count_firing(out.values, out.indices, x.shape[0])
        self.step_count += 1
        metrics = StepMetrics(loss.detach(), fvu.detach(), aux.detach(),
                              (out.values != 0).sum(1).float().mean(), grad_norm.detach())
        for name, value in vars(metrics).items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.sum_steps += 1
        return metrics

    @torch.no_grad()
    def _count_firing(self, values: torch.Tensor, indices: torch.Tensor, n_tokens: int) -> None:
        active = indices[values != 0]
        counts = torch.bincount(active, minlength=self.cfg.n_latents)
        self.fire_counts += counts
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[counts > 0] = 0

    def read_sums(self) -> dict[str, float]:
        """Means since the last read (one host sync), plus dead fraction and lr."""
        out = {name: (value / max(1, self.sum_steps)).item() for name, value in self.sums.items()}
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

    @contextmanager
    def evaluating(self):
        """Inference mode for eval/export: the module's eval() (kinds may select differently)
        and the optimizer's evaluation weights (schedule-free averages)."""
        self.sae.eval()
        try:
            with self.stepper.weights_for_eval():
                yield self.sae
        finally:
            self.sae.train()

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "stepper": self.stepper.state_dict(),
                "tokens_since_fired": self.tokens_since_fired, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.stepper.load_state_dict(state["stepper"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.step_count = int(state["step_count"])


def total_steps_for(train_cfg: TrainConfig) -> int:
    return max(1, math.ceil(train_cfg.total_tokens / train_cfg.batch_size))
