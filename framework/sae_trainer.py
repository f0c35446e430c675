"""One SAE's training: the objective (normalised MSE + AuxK + the kind's own terms), the
decoder-norm constraint, optimizer/engine wrapping, dead-latent counters, and metric sums kept
on the device (read only when logged).

Data parallel exactness: each rank sees its slice of the global batch. The loss normalisers
(the batch's centred sum of squares) and the firing counts are summed over ranks, and each
rank's loss is its share of the global loss times the world size, so that the engine's
gradient averaging yields exactly the gradient of the global-batch loss.

Latent shards (dist.latent_shards > 1): the SAE is this rank's `LatentShardedTopK` slice,
cut from the same full initialisation as an unsharded run (built once on the CPU, then
dropped), so 1 and T shards train the same weights. "world" here is the data-parallel size
(the ranks of a shard group see the same tokens). Firing counts and dead-latent counters are kept for all n latents on every rank: each
shard counts its own latents, and one all-reduce over all ranks completes them.

Gradient accumulation: each step() runs grad_accumulation_steps micro-batches (the rank's
batch split in equal parts); the step's loss is the exact mean of their losses, each
normalised by its own micro-batch statistics; dead latents (AuxK) and the annealed k are
fixed within a step, firing counts are reduced once per step (see framework/engine.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from framework import optim, tensor_parallel
from framework.schema import SAEConfig, TrainConfig
from framework.kinds import build_sae
from framework.sae import SAEBase, TopKSAE


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

    loss: torch.Tensor  # each: this rank's share of the step's mean over its micro-batches
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
        values, ids = sae.encode_rows(x, dead_ids, k_aux)  # a latent shard: its dead rows, selected globally
        e_hat = sae.decode(values, ids, with_bias=False)
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
        sae = build_sae(cfg.kind, d_in, cfg.n_latents, cfg.k, d_out=d_out, seed=seed, options=cfg.options,
                        skip_connection=cfg.skip_connection)
        self.latent_shards = engine.latent_shards if engine is not None else 1
        if self.latent_shards > 1:  # this rank's rows of the same initial SAE
            sae = tensor_parallel.from_full(sae, group=engine.tp_group)
        self.sae: SAEBase = sae.to(device)
        self.world = engine.dp_world if engine is not None else 1  # ranks that split the batch
        self.reduce = engine.data_reduce_ if self.world > 1 else (lambda t: t)
        # sums of per-latent counts (each shard counts only its latents) over all ranks
        self.latent_reduce = engine.all_reduce_ if engine is not None and engine.world > 1 else (lambda t: t)
        self.counts_tokens = engine is None or engine.tp_rank == 0  # one shard of each group counts its tokens
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
                [p for p in self.sae.parameters() if p.requires_grad], self.lr, self.train_cfg, self.total_steps)
            wrap = self.engine.wrap if self.engine is not None else Runner
            self._runner = wrap(self.objective, opt, sched, self.train_cfg.grad_clip,
                                self.train_cfg.grad_accumulation_steps)
        return self._runner

    def reset_sums(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.sum_steps = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def step(self, x_raw: torch.Tensor, y_raw: torch.Tensor) -> StepMetrics:
        """One optimizer step on this rank's part of the global batch (grad_accumulation_steps
        micro-batches; gradients synchronised on the last)."""
        runner = self.stepper
        k = annealed_k(self.cfg, self.step_count, self.total_steps)
        # one host sync: how many latents are dead decides the AuxK work
        dead_ids = self.dead_mask().nonzero().squeeze(1) if self.cfg.aux_coef > 0 else None
        micro = self.train_cfg.grad_accumulation_steps
        size = x_raw.shape[0] // micro
        fired = torch.zeros(self.cfg.n_latents, dtype=torch.long, device=x_raw.device)
        outs, losses = [], 0
        for i in range(micro):
            rows = slice(i * size, (i + 1) * size)
            with runner.micro_step(last=i == micro - 1):
                loss, fvu, aux, out = runner(x_raw[rows], y_raw[rows], k, dead_ids, self.train_cfg.autocast == "bfloat16")
                runner.backward(loss)
            losses = losses + torch.stack([loss.detach() / self.world, fvu, aux]) / micro
            fired += torch.bincount(out.indices[out.values != 0], minlength=self.cfg.n_latents)
            outs.append(out)
        grad_norm = runner.step()
        with runner.gathered(modify=True), torch.no_grad():
            self.sae.renorm_decoder()
            for out in outs:
                self.sae.after_step(out)
        l0 = self._count_firing(fired, x_raw.shape[0])
        self.sae.after_global_step(l0)
        self.step_count += 1
        metrics = StepMetrics(*losses, l0 / self.world, grad_norm.to(losses.device) / self.world)
        for name, value in vars(metrics).items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.sum_steps += 1
        return metrics

    @torch.no_grad()
    def _count_firing(self, fired: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Add this rank's firing counts (its tokens; a latent shard fills only its latents) to
        the global batch's (one all-reduce of n+1 longs); returns the batch's mean L0."""
        tokens = torch.tensor([n_tokens if self.counts_tokens else 0], device=fired.device)
        counts = self.latent_reduce(torch.cat([fired, tokens]))
        counts, global_tokens = counts[:-1], int(counts[-1])
        self.fire_counts += counts
        self.tokens_since_fired += global_tokens
        self.tokens_since_fired[counts > 0] = 0
        return counts.sum().float() / global_tokens

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

    def full_sae(self) -> TopKSAE | None:
        """The SAE with whole parameters: itself, under ZeRO-3 a gathered copy, with latent
        shards a gathered TopKSAE on the first shard's rank of each group (None on the other
        shards' ranks). Collective under ZeRO-3 and with latent shards."""
        if self.latent_shards > 1:
            return tensor_parallel.gather_full(self.sae, dst=0)
        runner = self.stepper
        if not hasattr(runner, "stage") or runner.stage < 3:
            return self.sae
        with runner.gathered():
            state = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        copy = build_sae(self.cfg.kind, self.sae.d_in, self.cfg.n_latents, self.cfg.k,
                         d_out=self.sae.d_out if self.sae.is_transcoder else None, options=self.cfg.options,
                         skip_connection=self.cfg.skip_connection)
        copy.load_state_dict(state)
        return copy.to(self.tokens_since_fired.device)

    @contextmanager
    def evaluating(self, whole: bool = False):
        """Inference mode for eval/export: the module's eval() (kinds may select differently)
        and the optimizer's evaluation weights (schedule-free). Latent shards are yielded as
        they are (every rank of the group runs them together, on the same batches) unless
        `whole` (export): then `full_sae()`, None on the other shards' ranks."""
        with self.stepper.weights_for_eval():
            sae = self.full_sae() if whole or self.latent_shards == 1 else self.sae
            if sae is not None:
                sae.eval()
            try:
                yield sae
            finally:
                if sae is not None:
                    sae.train()

    # -- checkpoint state, in the whole model's layout whatever the latent shards -------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The whole SAE's state_dict (TopKSAE names). Collective under ZeRO-3 (gathered on
        every rank) and with latent shards (gathered on each group's first shard; {} on the
        other shards' ranks, which write nothing)."""
        if self.latent_shards > 1:
            return tensor_parallel.gather_state(self.sae, dst=0) or {}
        with self.stepper.gathered():
            return {k: v.detach().clone() for k, v in self.sae.state_dict().items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """A whole SAE's state_dict into this trainer's layout (a latent shard takes its rows)."""
        if self.latent_shards > 1:
            state = tensor_parallel.shard_state(self.sae, state)
        self.sae.load_state_dict(state)

    def optimizer_state(self) -> dict | None:
        """The torch runner's optimizer + scheduler state in the whole model's layout: each
        shard's Adam moments gathered on the group's first shard (None on the others), so the
        file is the same as an unsharded run's. Collective with latent shards."""
        state = self.stepper.optimizer_state()
        if self.latent_shards > 1:
            state = tensor_parallel.gather_optimizer_state(self.sae, state, dst=0)
        return state

    def load_optimizer_state(self, state: dict) -> None:
        if self.latent_shards > 1:
            state = tensor_parallel.shard_optimizer_state(self.sae, state)
        self.stepper.load_optimizer_state(state)


def total_steps_for(train_cfg: TrainConfig) -> int:
    return max(1, math.ceil(train_cfg.total_tokens / train_cfg.batch_size))
