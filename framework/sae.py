"""TopK sparse autoencoders (and transcoders) built on the sparse kernels.

The module works in normalised units: inputs are multiplied by `input_scale` (so that
E||x||^2 = d_in) and targets by `output_scale`; `export.py` folds both constants back into
the weights. Decoder rows are kept at unit norm (the trainer projects their gradient and
`renorm_decoder` corrects the curvature after each step).

Any transcoder kind can carry a linear skip connection (`build_sae(..., skip_connection=True)`,
config `saes.N.skip_connection`): `with_skip(cls)` derives the kind's skip variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from framework.errors import ConfigError
from framework.losses import TrainingBatch
from framework.registry import Registry

SAE_KINDS: Registry[type] = Registry("SAE kind")


@dataclass
class SAEOutput:
    x_hat: torch.Tensor  # [B, d_out], normalised units
    values: torch.Tensor  # [B, k]: codes (0 where a slot is unused)
    indices: torch.Tensor  # [B, k]: latent ids
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # a kind's extra loss terms, weighted
    # (values, latent ids) [B, k_aux]: AuxK's selection when the encode made it (batch.aux_request)
    aux_selection: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class NoOptions:
    """Kind-specific options (`saes.N.options` in the config); TopK has none."""


class SAEBase(nn.Module):
    """What every layout of a dictionary shares (whole, or a shard of its latents): the
    parameters, the normalisation units and the unit-norm decoder constraint."""

    needs_lm_grad = False  # capability: the step needs d(LM loss)/d(activation) (gsae)
    supports_transcoder = True  # capability: may predict another site (output_site) than it reads
    variable_l0 = False  # capability: the number of active latents varies per token (else at most k)
    has_skip = False  # True for the with_skip() variants
    cross_layer = False  # capability: reads and writes stacked sites of several layers (its own, see configured_sites)
    export_format = "saelens"  # framework/export.py EXPORT_FORMATS
    output_layers: list[int] | None = None  # layers stacked in the output (per-layer metrics), None: one site

    @classmethod
    def configured_sites(cls, options) -> tuple[str, str] | None:
        """(input site, output site) a kind derives from its options (None: the config names them)."""
        return None

    @classmethod
    def shape_from_weights(cls, weights: dict, options, transcoder: bool) -> tuple[int, int, int | None]:
        """(d_in, n_latents, d_out or None) of saved weights, for rebuilding from a checkpoint."""
        n_latents, d_in = weights["encoder_weight"].shape
        return d_in, n_latents, weights["decoder_weight"].shape[1] if transcoder else None

    def _make_parameters(self, n_rows: int, d_in: int, d_out: int, is_transcoder: bool, g: torch.Generator,
                         dtype: torch.dtype = torch.float32, device=None) -> None:
        self.d_in, self.d_out, self.is_transcoder = d_in, d_out, is_transcoder
        dec = torch.randn(n_rows, d_out, generator=g, dtype=dtype)
        dec /= dec.norm(dim=1, keepdim=True)
        # Tied init (encoder = decoder^T) for SAEs; a random encoder of matching scale for transcoders.
        enc = dec.clone() if not is_transcoder else torch.randn(n_rows, d_in, generator=g, dtype=dtype) / math.sqrt(d_in)
        self.encoder_weight = nn.Parameter(enc.to(device))
        self.encoder_bias = nn.Parameter(torch.zeros(n_rows, dtype=dtype, device=device))
        self.decoder_weight = nn.Parameter(dec.to(device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.register_buffer("output_scale", torch.ones((), device=device))

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.input_scale

    def normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.output_scale

    def denormalize_target(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.output_scale

    def normalize_lm_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(target) in normalised units: the target is scaled by output_scale."""
        return grad / self.output_scale

    def input_offset(self) -> torch.Tensor:
        """Subtracted from inputs before encoding: b_dec for SAEs, nothing for transcoders."""
        return self.b_dec if not self.is_transcoder else self.b_dec.new_zeros(self.d_in)

    @torch.no_grad()
    def reconstruct(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the caller's (unnormalised) units."""
        return self.denormalize_target(self(self.normalize_input(x_raw.float())).x_hat)

    def splice_predictor(self):
        """What evaluation splices in (framework/hooks.py splice_prediction): raw input -> raw
        reconstruction (cross-layer kinds: a layer-wise predictor)."""
        return self.reconstruct

    def reconstruction_loss(self, x_hat: torch.Tensor, batch: TrainingBatch) -> torch.Tensor:
        """The objective's reconstruction term (and the logged train FVU): the normalised MSE."""
        return batch.normalized_mse(x_hat)

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        """Parameters whose rows (dim 0, the rest flattened) are kept at unit norm."""
        return [self.decoder_weight]

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, normalize: bool, b_dec_init: str) -> None:
        """Normalisation constants and b_dec from a sample of (input, target) activations
        (give every rank the same sample: the result is then replicated)."""
        if normalize:
            self.input_scale.fill_(math.sqrt(self.d_in / x.pow(2).sum(1).mean().item()))
            self.output_scale.fill_(math.sqrt(self.d_out / y.pow(2).sum(1).mean().item()))
        self.b_dec.copy_(B_DEC_INIT[b_dec_init](y * self.output_scale).to(self.b_dec.dtype))

    @torch.no_grad()
    def renorm_decoder(self) -> None:
        self.decoder_weight /= self.decoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def after_global_step(self, l0: torch.Tensor) -> None:
        """Called (without grad) once per optimizer step with the global batch's mean L0 (a 0-d
        tensor, summed over ranks and micro-batches, so equal on every rank): state that must
        agree across ranks (JumpReLU's L0 controller) updates here, not in after_step."""


@SAE_KINDS.register("topk")
class TopKSAE(SAEBase):
    """Keeps the k largest relu pre-activations per token.

    A new SAE kind subclasses this and registers itself in SAE_KINDS (and is imported in
    framework/kinds.py); it may override `Options` (a dataclass of its hyperparameters),
    `forward` (selection; extra loss terms in SAEOutput.losses as this rank's shares of the
    global batch's, built with the TrainingBatch it gets in training), `after_step` (state
    updates after each optimizer step), `export_architecture` and `export_extra`, and declare
    its capabilities (class attributes of SAEBase: `needs_lm_grad`, `variable_l0`, ...).
    """

    use_abs = False
    export_architecture = "topk"
    export_encoder = True  # W_enc/b_enc are written (a tied kind's SAELens class rejects them)
    Options = NoOptions

    def __init__(self, d_in: int, n_latents: int, k: int, d_out: int | None = None, seed: int = 0,
                 options=None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.n_latents, self.k = n_latents, k
        self._make_parameters(n_latents, d_in, d_out or d_in, d_out is not None, torch.Generator().manual_seed(seed))

    # -- math ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, k: int | None = None, latent_mask: torch.Tensor | None = None):
        return kernels.topk_encode(x, self.encoder_weight, self.encoder_bias, self.input_offset(), k or self.k,
                                   use_abs=self.use_abs, latent_mask=latent_mask)

    def encode_rows(self, x: torch.Tensor, rows: torch.Tensor, k: int):
        """Top k among the latents `rows` only (AuxK's dead latents): (values, latent ids).
        Only those encoder rows are multiplied (B*d*len(rows), not another full pass)."""
        values, sub = kernels.topk_encode(x, self.encoder_weight[rows], self.encoder_bias[rows], self.input_offset(),
                                          k, use_abs=self.use_abs)
        return values, rows[sub]

    def decode(self, values: torch.Tensor, indices: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        out = kernels.sparse_decode(values, indices, self.decoder_weight)
        return out + self.b_dec if with_bias else out

    def forward(self, x: torch.Tensor, k: int | None = None, batch: TrainingBatch | None = None) -> SAEOutput:
        """`batch` (training only): the target, LM gradient and cross-rank reduction a kind's
        own losses and selections may use (framework/losses.py); TopK uses only its AuxK
        request, selecting the dead latents' top k_aux in the same encode."""
        request = batch.aux_request if batch is not None else None
        if request is None:
            values, indices = self.encode(x, k)
            return SAEOutput(self.decode(values, indices), values, indices)
        values, indices, aux_values, aux_ids = kernels.topk_encode_with_aux(
            x, self.encoder_weight, self.encoder_bias, self.input_offset(), k or self.k, request.latent_ids,
            request.k, use_abs=self.use_abs)
        return SAEOutput(self.decode(values, indices), values, indices, aux_selection=(aux_values, aux_ids))

    def training_batch(self, x: torch.Tensor, batch: TrainingBatch | None) -> TrainingBatch:
        """`batch`, or one process's batch of `x` for a training forward called without one (an
        SAE's target is its input; a transcoder's is unknown: its losses then ask for it)."""
        return batch if batch is not None else TrainingBatch(target=None if self.is_transcoder else x)

    def after_step(self, out: SAEOutput) -> None:
        """Called (without grad) after each optimizer step; e.g. running thresholds."""

    def export_extra(self, input_scale: float, output_scale: float) -> dict[str, torch.Tensor]:
        """Tensors beyond W_enc/b_enc/W_dec/b_dec for the SAELens export, in raw units."""
        return {}

    def load_export_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of export_extra on an export loaded with unit scales."""

    def export_config(self) -> dict:
        """cfg.json fields beyond the common ones that the kind's SAELens architecture reads."""
        return {}

    def saelens_caveat(self) -> str:
        """Why the SAELens architecture it exports as does not compute this SAE's function with
        these options ("" = it does, up to float rounding)."""
        return ""


@SAE_KINDS.register("abstopk")
class AbsTopKSAE(TopKSAE):
    """Keeps the k largest |pre| with their sign: one latent can encode both directions."""

    use_abs = True
    export_architecture = "abstopk"


class SkipConnection(nn.Module):
    """A linear map from the input site to the output site: x @ weight^T, weight [d_out, d_in]
    (the layout SAELens and circuit-tracer store as W_skip). Starts at zero, so a skip
    transcoder starts as the same function as the plain one."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class SkipTranscoder:
    """Mixin (see `with_skip`) adding a jointly trained linear skip to a transcoder kind:
    x_hat = the kind's reconstruction + x @ W_skip^T. The skip sits with b_dec: while the kind's
    forward runs, every `decode(..., with_bias=True)` adds it, so the kind's own terms that
    reconstruct the target (Matryoshka's prefixes) include it, and those that decode without
    the bias (AuxK, aux_zipf) leave it out, as they leave out b_dec. `decode` called outside
    a forward has no input, hence no skip. The decoder-norm constraint concerns W_dec only."""

    has_skip = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.is_transcoder:
            raise ConfigError("skip_connection: a skip connection maps the input site to a different output site; "
                              "it needs a transcoder (set output_site), not an SAE")
        self.skip = SkipConnection(self.d_in, self.d_out)
        self._skip_out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> SAEOutput:
        self._skip_out = self.skip(x)
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self._skip_out = None

    def decode(self, values: torch.Tensor, indices: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        out = super().decode(values, indices, with_bias=with_bias)
        return out + self._skip_out.to(out.dtype) if with_bias and self._skip_out is not None else out

    def linear_part(self, x: torch.Tensor) -> torch.Tensor:
        """The transcoder with every latent off: b_dec + x @ W_skip^T (normalised units)."""
        return self.skip(x) + self.b_dec


_SKIP_VARIANTS: dict[type, type] = {}


def with_skip(cls: type) -> type:
    """The skip-connection variant of an SAE kind (one class per kind, made once)."""
    if cls not in _SKIP_VARIANTS:
        _SKIP_VARIANTS[cls] = type(f"Skip{cls.__name__}", (SkipTranscoder, cls),
                                   {"__doc__": f"{cls.__name__} with a linear skip connection (SkipTranscoder)."})
    return _SKIP_VARIANTS[cls]


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1e-12):
            median = new
            break
        median = new
    return median.float()


B_DEC_INIT = {
    "geometric_median": geometric_median,
    "mean": lambda y: y.mean(0),
    "zeros": lambda y: y.new_zeros(y.shape[1]),
}
