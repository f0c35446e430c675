"""Batch-level allocations of the sparsity budget: BatchTopK, Mutual Choice, Feature Choice.

All three select token-latent pairs over the whole batch during training, so the number of
active latents varies per token; at inference (module.eval()) they use thresholds learned
during training and export as SAELens `jumprelu` (`threshold` [d_sae], in raw units).
Math: framework/variants/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.losses import TrainingBatch, aux_k_loss
from framework.sae import SAE_KINDS, SAEOutput
from framework.variants.common import (
    DensityTracker,
    RunningThreshold,
    VariantSAE,
    batch_topk_select,
    ceil_div,
    default_width,
    feature_topm_select,
    require,
    threshold_select,
    zipf_underused,
)


@dataclass
class BatchTopKOptions:
    threshold_beta: float = 0.99  # EMA factor of the inference threshold (smallest selected value)
    candidate_factor: int = 4  # per-token kernel candidates start at factor * k (widened when needed)
    encoder_init_scale: float = 0.0  # encoder rows start at this norm; 0 = sqrt(d_in / n_latents) (see README)

    def __post_init__(self):
        require(0 <= self.threshold_beta < 1, "options.threshold_beta: must be in [0, 1)")
        require(self.candidate_factor >= 1, "options.candidate_factor: must be >= 1")
        require(self.encoder_init_scale >= 0, "options.encoder_init_scale: must be >= 0")


@SAE_KINDS.register("batchtopk")
class BatchTopKSAE(VariantSAE):
    """Training: the k*B largest relu pre-activations of the batch. Inference: pre > threshold,
    the threshold being a running estimate of the smallest selected value."""

    Options = BatchTopKOptions
    export_architecture = "jumprelu"
    variable_l0 = True
    per_latent_threshold = False

    def __init__(self, d_in, n_latents, k, d_out=None, seed=0, options=None):
        super().__init__(d_in, n_latents, k, d_out=d_out, seed=seed, options=options)
        self.running = RunningThreshold(n_latents, self.per_latent_threshold, self.options.threshold_beta)
        # the kernel width the last batch needed (x1.5): a buffer, so a resumed run starts from
        # the same width and packs its selection in the same order (bitwise resume)
        self.register_buffer("width_hint", torch.zeros((), dtype=torch.long))
        if self.batch_level_selection():
            # A batch-level selection lets high-norm tokens take many latents; with unit-norm
            # tied rows their initial reconstructions overshoot badly (FVU >> 1) and training
            # recovers slowly. Smaller encoder rows remove that (selection is scale-invariant).
            scale = self.options.encoder_init_scale or min(1.0, (d_in / n_latents) ** 0.5)
            with torch.no_grad():
                self.encoder_weight.mul_(scale / self.encoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def batch_level_selection(self) -> bool:
        return True

    # -- selection ------------------------------------------------------------------
    def _width(self, k: int) -> int:
        return default_width(k, self.options.candidate_factor, self.n_latents)

    def select_train(self, x: torch.Tensor, k: int):
        # start the kernel at the width the last batch needed (x1.5): usually no re-run
        start = max(self._width(k), int(self.width_hint))
        values, indices = batch_topk_select(x, self.encoder_weight, self.encoder_bias, self.input_offset(), k, start)
        self.width_hint.fill_(min(self.n_latents, values.shape[1] * 3 // 2 + 1))
        return values, indices

    def select_inference(self, x: torch.Tensor, k: int):
        if not self.running.ready:  # never trained: no threshold yet, fall back to per-token TopK
            return self.encode(x, k)
        return threshold_select(x, self.encoder_weight, self.encoder_bias, self.input_offset(),
                                self.running.threshold(), self._width(k))

    def forward(self, x: torch.Tensor, k: int | None = None, batch: TrainingBatch | None = None) -> SAEOutput:
        k = k or self.k
        values, indices = self.select_train(x, k) if self.training else self.select_inference(x, k)
        out = SAEOutput(self.decode(values, indices), values, indices)
        if self.training:
            out.losses.update(self.extra_losses(x, out, batch))
        return out

    def extra_losses(self, x: torch.Tensor, out: SAEOutput, batch: TrainingBatch | None) -> dict:
        return {}

    def after_step(self, out: SAEOutput) -> None:
        self.running.update(out.values, out.indices)

    # -- export -----------------------------------------------------------------------
    def export_extra(self, input_scale: float, output_scale: float) -> dict[str, torch.Tensor]:
        # pre-activations of the folded export are pre / output_scale, and so is the threshold
        theta = self.running.threshold().detach().float().expand(self.n_latents)
        return {"threshold": theta / output_scale}

    def load_export_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        self.running.load(tensors.pop("threshold").to(self.running.ema.dtype))


# ----------------------------------------------------------------------------- aux_zipf


@dataclass
class ChoiceOptions(BatchTopKOptions):
    aux_zipf_coef: float = 0.0  # weight of aux_zipf (0 = off; the trainer's AuxK runs regardless)
    zipf_fraction: float = 0.1  # under-utilised: density < fraction * Zipf-predicted density at its rank
    aux_zipf_k: int = 0  # latents per token in aux_zipf; 0 = d_in // 2
    density_beta: float = 0.99  # EMA factor of the per-latent firing densities

    def __post_init__(self):
        super().__post_init__()
        require(self.aux_zipf_coef >= 0, "options.aux_zipf_coef: must be >= 0")
        require(0 < self.zipf_fraction <= 1, "options.zipf_fraction: must be in (0, 1]")
        require(self.aux_zipf_k >= 0, "options.aux_zipf_k: must be >= 0")
        require(0 <= self.density_beta < 1, "options.density_beta: must be in [0, 1)")


class _ZipfAux:
    """aux_zipf: AuxK generalised from dead latents to under-utilised ones (see README)."""

    def _init_zipf(self):
        self.density = DensityTracker(self.n_latents, self.options.density_beta)

    def zipf_loss(self, x: torch.Tensor, out: SAEOutput, batch: TrainingBatch | None) -> dict:
        opts = self.options
        if opts.aux_zipf_coef <= 0 or int(self.density.steps) == 0:
            return {}
        ids = zipf_underused(self.density.density(), opts.zipf_fraction).nonzero().squeeze(1)
        if ids.numel() == 0:
            return {}
        batch = self.training_batch(x, batch)
        residual = (batch.target - out.x_hat).detach()
        k_aux = opts.aux_zipf_k or max(1, self.d_in // 2)
        return {"aux_zipf": opts.aux_zipf_coef * aux_k_loss(self, x, residual, ids, k_aux, batch)}


@SAE_KINDS.register("mutual_choice")
class MutualChoiceSAE(_ZipfAux, BatchTopKSAE):
    """Mutual Choice: the budget k*B is allocated freely over token-latent pairs (the largest
    pre-activations of the batch, as BatchTopK), plus the optional aux_zipf loss."""

    Options = ChoiceOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_zipf()

    def extra_losses(self, x, out, batch):
        return self.zipf_loss(x, out, batch)

    def after_step(self, out: SAEOutput) -> None:
        super().after_step(out)
        self.density.update(out.values, out.indices)


@dataclass
class FeatureChoiceOptions(ChoiceOptions):
    m: int = 0  # tokens each latent may match per batch; 0 = ceil(k * B / n_latents)
    capacity: str = "uniform"  # uniform: every latent gets m | zipf: m_i ~ rank_i^-zipf_exponent, same total
    zipf_exponent: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        require(self.m >= 0, "options.m: must be >= 0")
        require(self.capacity in ("uniform", "zipf"), f"options.capacity: '{self.capacity}' is not one of ['uniform', 'zipf']")
        require(self.zipf_exponent >= 0, "options.zipf_exponent: must be >= 0")


@SAE_KINDS.register("feature_choice")
class FeatureChoiceSAE(_ZipfAux, BatchTopKSAE):
    """Feature Choice: each latent matches at most m tokens of the batch (its m largest
    pre-activations). Inference: a threshold per latent, the running estimate of its m-th value."""

    Options = FeatureChoiceOptions
    per_latent_threshold = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_zipf()

    def capacities(self, k: int, batch: int) -> int | torch.Tensor:
        opts = self.options
        m = opts.m or ceil_div(k * batch, self.n_latents)
        if opts.capacity == "uniform" or int(self.density.steps) == 0:
            return m
        # Zipf capacities: latents ranked by their running density, total budget m * n kept
        rank = self.density.density().argsort(descending=True).argsort() + 1
        share = rank.double().pow(-opts.zipf_exponent)
        caps = (share / share.sum() * (m * self.n_latents)).round().clamp(1, batch).long()
        return caps.to(self.encoder_weight.device)

    def select_train(self, x, k):
        return feature_topm_select(x, self.encoder_weight, self.encoder_bias, self.input_offset(),
                                   self.capacities(k, x.shape[0]))

    def extra_losses(self, x, out, batch):
        return self.zipf_loss(x, out, batch)

    def after_step(self, out: SAEOutput) -> None:
        super().after_step(out)
        self.density.update(out.values, out.indices)
