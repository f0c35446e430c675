"""One SAE's training: the objective (normalised MSE + AuxK + the kind's own terms), the step
(micro-batches, optimizer, decoder-norm constraint), and the dead-latent counters and metric
sums kept on the device (read only when logged). How the SAE is laid out over the ranks (one
process, ddp, latent shards, ZeRO) is its Runner's business (framework/runners.py).

Data parallel exactness: each rank sees its slice of the global batch. The loss normalisers
(the batch's centred sum of squares) and the firing counts are summed over ranks, and each
rank's loss is its share of the global loss (framework/losses.py) times the data-parallel
size, so that the gradient averaging yields exactly the gradient of the global-batch loss.

Gradient accumulation: each step() runs grad_accumulation_steps micro-batches (the rank's
batch split in equal parts); the step's loss is the exact mean of their losses, each
normalised by its own micro-batch statistics; dead latents (AuxK) and the annealed k are
fixed within a step, firing counts are reduced once per step (see framework/engine.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from framework import optim
from framework.engine import Engine
from framework.kinds import build_sae
from framework.losses import AuxRequest, TrainingBatch, aux_k_loss, aux_k_take
from framework.runners import Runner
from framework.schema import SAEConfig, TrainConfig
from framework.stateful import Saved, State, StateDict
from framework.step_clock import StepClock


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
    """What the runner wraps (DDP / DeepSpeed): the SAE forward and its loss, so that every
    parameter use, AuxK's included, happens inside the wrapped forward."""

    def __init__(self, sae, cfg: SAEConfig, aux_k: int, runner: Runner):
        super().__init__()
        self.sae, self.cfg, self.aux_k = sae, cfg, aux_k
        self.world, self.reduce = runner.data_world, runner.reduce_batch
        # Project out each decoder row's radial gradient as the gradient is produced: linear, so
        # it commutes with the gradient averaging, and it runs before any ZeRO partitioning.
        for param in sae.unit_norm_decoders():
            param.register_hook(lambda grad, param=param: self._project_radial(grad, param))

    @staticmethod
    def _project_radial(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        w = param.detach()
        if w.shape != grad.shape:  # ZeRO-3 released the full weight: leave the gradient as is
            return grad
        return kernels.project_out_radial(grad.flatten(1), w.flatten(1)).view_as(grad)

    def forward(self, x_raw: torch.Tensor, y_raw: torch.Tensor, k: int, dead_ids: torch.Tensor | None,
                autocast: bool = False, lm_grad_raw: torch.Tensor | None = None):
        sae = self.sae
        x, y = sae.normalize_input(x_raw), sae.normalize_target(y_raw)
        lm_grad = sae.normalize_lm_grad(lm_grad_raw) if lm_grad_raw is not None else None
        with_aux = dead_ids is not None and dead_ids.numel() > 0
        request = AuxRequest(dead_ids, aux_k_take(self.aux_k, dead_ids)) if with_aux else None
        batch = TrainingBatch(target=y, lm_grad=lm_grad, reduce=self.reduce, aux_request=request)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = sae(x, k, batch=batch)
            fvu = sae.reconstruction_loss(out.x_hat.float(), batch)
            aux = (aux_k_loss(sae, x, (y - out.x_hat).detach().float(), dead_ids, self.aux_k, batch, out.aux_selection)
                   if with_aux else fvu.new_zeros(()))
            loss = fvu + self.cfg.aux_coef * aux + sum(out.losses.values(), fvu.new_zeros(()))
        # x world: the runner averages gradients over the ranks; the global loss is their sum.
        return loss * self.world, fvu.detach(), aux.detach(), out


class SAETrainer:
    """Trains one SAE on (input, target) rows; a Stateful component of the run (its weights and
    optimizer through its runner, its counters and metric sums itself)."""

    def __init__(self, cfg: SAEConfig, train_cfg: TrainConfig, input_site: str, output_site: str,
                 dims: dict[str, int], total_steps: int, device: torch.device, seed: int,
                 engine: Engine | None = None):
        self.cfg, self.train_cfg, self.total_steps = cfg, train_cfg, total_steps
        self.input_site, self.output_site = input_site, output_site  # keys of the activation batches
        d_out = dims[output_site] if output_site != input_site else None

        def blueprint(seed: int = seed):
            return build_sae(cfg.kind, dims[input_site], cfg.n_latents, cfg.k, d_out=d_out, seed=seed,
                             options=cfg.options, skip_connection=cfg.skip_connection)

        lr = cfg.lr or optim.default_lr(train_cfg.optimizer, cfg.n_latents)
        aux_k = cfg.aux_k or max(1, dims[input_site] // 2)
        runner_class = engine.runner_class() if engine is not None else Runner
        kwargs = {"engine": engine} if engine is not None else {}
        sae = blueprint().to(device)
        self.n_latents = sae.n_latents  # all latents (a cross-layer kind's: n_latents per layer x layers)
        self.runner: Runner = runner_class(
            sae, lambda sae, runner: SAEObjective(sae, cfg, aux_k, runner),
            lambda params: optim.OPTIMIZERS[train_cfg.optimizer](params, lr, train_cfg, total_steps),
            train_cfg, blueprint, eval_weights=train_cfg.optimizer in optim.EVAL_WEIGHTS, **kwargs)
        self.tokens_since_fired = torch.zeros(self.n_latents, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.long, device=device)  # since last histogram
        self.step_count = 0
        self.clock = StepClock(device)  # this trainer's own step time (not checkpointed: this process's steps)
        self._read_clock = (0, 0.0)  # (steps, seconds) at the last read_sums
        self.reset_sums()

    @property
    def sae(self):
        """The module this rank trains (a latent shard: its latents)."""
        return self.runner.sae

    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, normalize: bool | None = None,
                         b_dec_init: str | None = None) -> None:
        """Normalisation constants and b_dec from a sample (give every rank the same one);
        the config's choices unless given. Under ZeRO the change reaches the master weights."""
        normalize = self.cfg.normalize_activations if normalize is None else normalize
        with self.runner.gathered(modify=True), torch.no_grad():
            self.sae.init_from_sample(x, y, normalize, b_dec_init or self.cfg.b_dec_init)

    def reset_sums(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.sum_steps = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def step(self, x_raw: torch.Tensor, y_raw: torch.Tensor, lm_grad: torch.Tensor | None = None) -> StepMetrics:
        """One optimizer step on this rank's part of the global batch (grad_accumulation_steps
        micro-batches; gradients synchronised on the last). `lm_grad`: d(LM loss)/d(target),
        raw units, row-aligned (for kinds that `needs_lm_grad`)."""
        with self.clock.timing():
            return self._step(x_raw, y_raw, lm_grad)

    def _step(self, x_raw: torch.Tensor, y_raw: torch.Tensor, lm_grad: torch.Tensor | None) -> StepMetrics:
        runner = self.runner
        k = annealed_k(self.cfg, self.step_count, self.total_steps)
        # one host sync: how many latents are dead decides the AuxK work
        dead_ids = self.dead_mask().nonzero().squeeze(1) if self.cfg.aux_coef > 0 else None
        micro = self.train_cfg.grad_accumulation_steps
        size = x_raw.shape[0] // micro
        fired = torch.zeros(self.n_latents, dtype=torch.long, device=x_raw.device)
        outs, losses = [], 0
        for i in range(micro):
            rows = slice(i * size, (i + 1) * size)
            with runner.micro_step(last=i == micro - 1):
                loss, fvu, aux, out = runner(x_raw[rows], y_raw[rows], k, dead_ids, self.train_cfg.autocast == "bfloat16",
                                             None if lm_grad is None else lm_grad[rows])
                runner.backward(loss)
            losses = losses + torch.stack([loss.detach() / runner.data_world, fvu, aux]) / micro
            fired += torch.bincount(out.indices[out.values != 0], minlength=self.n_latents)
            outs.append(out)
        grad_norm = runner.step()
        with runner.gathered(modify=True), torch.no_grad():
            self.sae.renorm_decoder()
            for out in outs:
                self.sae.after_step(out)
        l0 = self._count_firing(fired, x_raw.shape[0])
        self.sae.after_global_step(l0)
        self.step_count += 1
        metrics = StepMetrics(*losses, l0 / runner.data_world, grad_norm.to(losses.device) / runner.data_world)
        for name, value in vars(metrics).items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.sum_steps += 1
        return metrics

    @torch.no_grad()
    def _count_firing(self, fired: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Add this rank's firing counts (its tokens; a latent shard fills only its latents) to
        the global batch's (one all-reduce of n+1 longs); returns the batch's mean L0."""
        tokens = torch.tensor([n_tokens if self.runner.counts_tokens else 0], device=fired.device)
        counts = self.runner.reduce_counts(torch.cat([fired, tokens]))
        counts, global_tokens = counts[:-1], int(counts[-1])
        self.fire_counts += counts
        self.tokens_since_fired += global_tokens
        self.tokens_since_fired[counts > 0] = 0
        return counts.sum().float() / global_tokens

    def read_sums(self) -> dict[str, float]:
        """Means since the last read (one all-reduce + one host sync), dead fraction and lr."""
        names = list(self.sums)
        values = self.runner.reduce_batch(torch.stack([self.sums[n].float() for n in names])) / max(1, self.sum_steps)
        out = dict(zip(names, values.tolist()))
        out["dead_frac"] = self.dead_mask().float().mean().item()
        out["lr"] = self.runner.lr
        out["k"] = annealed_k(self.cfg, self.step_count, self.total_steps)
        steps, seconds = self.clock.steps, self.clock.seconds
        out["tokens_per_s"] = self._tokens_per_s(steps - self._read_clock[0], seconds - self._read_clock[1])
        self._read_clock = (steps, seconds)
        self.reset_sums()
        return out

    def _tokens_per_s(self, steps: int, seconds: float) -> float:
        """Global-batch tokens per second of this SAE's own steps."""
        return steps * self.train_cfg.batch_size / seconds if seconds > 0 else 0.0

    def training_cost(self) -> dict[str, float | int]:
        """What training this SAE alone cost in this process: its steps' time, train tokens/s
        (the global batch over this rank's step time), and this rank's bytes of parameters,
        gradients and optimizer state (Runner.state_bytes)."""
        memory = self.runner.state_bytes()
        seconds = self.clock.seconds
        return {"step_seconds": round(seconds, 3), "timed_steps": self.clock.steps,
                "tokens_per_s": round(self._tokens_per_s(self.clock.steps, seconds), 1),
                **memory, "state_bytes": sum(memory.values())}

    def density_log10(self, tokens: int) -> torch.Tensor:
        """log10 firing density of each latent since the last call (for the histogram)."""
        density = self.fire_counts.double() / max(1, tokens)
        self.fire_counts.zero_()
        return torch.log10(density + 1e-10)

    def evaluating(self, whole: bool = False):
        """Inference mode for eval/export (see Runner.evaluating): latent shards are yielded as
        they are (every rank of the group runs them together, on the same batches) unless
        `whole` (export): then the gathered SAE, None on the ranks that do not write."""
        return self.runner.evaluating(whole)

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """Collective under ZeRO-3 and with latent shards (weights are gathered)."""
        state = self.runner.state_dict()
        if state.shared is not None:
            state.shared.tensors |= {"tokens_since_fired": self.tokens_since_fired.cpu().clone(),
                                     "fire_counts": self.fire_counts.cpu().clone()}
            state.shared.meta["step_count"] = self.step_count
        local = state.local or State()
        local.tensors |= {f"sums.{k}": torch.as_tensor(v).detach().to("cpu").reshape(()).clone()
                          for k, v in self.sums.items()}
        local.meta["sum_steps"] = self.sum_steps
        return StateDict(state.shared, local)

    def load_state_dict(self, saved: Saved) -> None:
        """Weights, optimizer and counters from any layout; the metric sums only from the same
        rank of the same layout (they start over otherwise)."""
        self.runner.load_state_dict(saved)
        self.tokens_since_fired.copy_(saved.shared.tensors["tokens_since_fired"])
        self.fire_counts.copy_(saved.shared.tensors["fire_counts"])
        self.step_count = int(saved.shared.meta["step_count"])
        mine = saved.mine()
        if mine is not None:
            device = self.tokens_since_fired.device
            self.sums = {k[len("sums."):]: mine.tensors[k].to(device) for k in mine.tensors.keys() if k.startswith("sums.")}
            self.sum_steps = mine.meta["sum_steps"]


def total_steps_for(train_cfg: TrainConfig) -> int:
    return max(1, math.ceil(train_cfg.total_tokens / train_cfg.batch_size))
