"""MP-SAE (Costa et al., "From Flat to Hierarchical: Extracting Sparse Representations with
Matching Pursuit"): the encoder is matching pursuit over the (unit-norm) decoder dictionary,
unrolled for k residual-guided steps; at inference it can stop early per token once the
residual norm falls below a fraction of the input's. Math: framework/variants/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from framework.sae import SAE_KINDS, SAEOutput
from framework.variants.common import VariantSAE, coalesce, require


@dataclass
class MPOptions:
    stop_residual: float = 0.0  # inference: a token stops once ||r|| <= stop_residual * ||x - b_dec|| (0 = never)
    max_inference_steps: int = 0  # inference: pursuit steps at most; 0 = the config's k

    def __post_init__(self):
        require(0 <= self.stop_residual < 1, "options.stop_residual: must be in [0, 1)")
        require(self.max_inference_steps >= 0, "options.max_inference_steps: must be >= 0")


@SAE_KINDS.register("mpsae")
class MatchingPursuitSAE(VariantSAE):
    """Tied dictionary: selection and coefficients use the decoder rows. `encoder_weight` is
    kept equal to the decoder (synced after every step, and frozen: it is no parameter of the
    objective, so data-parallel wrappers expect no gradient for it) so that the export's
    W_enc = W_dec^T and the trainer's AuxK scores dead atoms by their correlation with
    x - b_dec. A latent picked at several steps is one active latent (its coefficients summed)."""

    Options = MPOptions
    export_architecture = "matching_pursuit"
    export_encoder = False  # SAELens' matching_pursuit is tied (W_enc = W_dec^T) and rejects W_enc/b_enc
    supports_transcoder = False  # the residual lives in the space being reconstructed

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_weight.requires_grad_(False)
        self.encoder_bias.requires_grad_(False)
        self.sync_encoder()

    @torch.no_grad()
    def sync_encoder(self) -> None:
        self.encoder_weight.copy_(self.decoder_weight)
        self.encoder_bias.zero_()

    def pursuit(self, x: torch.Tensor, steps: int, stop_residual: float = 0.0):
        """(values [B, steps], indices [B, steps], final residual). Each step: the atom with the
        largest positive correlation with the residual (the fused TopK kernel with k=1), its
        coefficient = that correlation, residual -= coefficient * atom. Differentiable."""
        w = self.decoder_weight
        zero_bias, zero_offset = w.new_zeros(self.n_latents), w.new_zeros(self.d_in)
        residual = x - self.b_dec
        floor = stop_residual * residual.detach().norm(dim=1) if stop_residual > 0 else None
        values, indices = [], []
        for _ in range(steps):
            v, j = kernels.topk_encode(residual, w, zero_bias, zero_offset, 1)
            if floor is not None:
                running = residual.detach().norm(dim=1, keepdim=True) > floor[:, None]
                if not bool(running.any()):
                    break
                v = torch.where(running, v, torch.zeros((), dtype=v.dtype, device=v.device))
            residual = residual - kernels.sparse_decode(v, j, w)
            values.append(v)
            indices.append(j)
        if not values:
            return x.new_zeros(x.shape[0], 1), torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device), residual
        return torch.cat(values, 1), torch.cat(indices, 1), residual

    def forward(self, x: torch.Tensor, k: int | None = None, batch=None) -> SAEOutput:
        k = k or self.k
        if self.training:
            values, indices, _ = self.pursuit(x, k)
        else:
            values, indices, _ = self.pursuit(x, self.options.max_inference_steps or k, self.options.stop_residual)
        values, indices = coalesce(values, indices)
        return SAEOutput(self.decode(values, indices), values, indices)

    def after_step(self, out: SAEOutput) -> None:
        self.sync_encoder()

    def load_export_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sync_encoder()

    def export_config(self) -> dict:
        # SAELens stops a token at an absolute residual norm, on a support that did not change, or
        # after max_iterations (default d_in); with the first two off it runs our fixed step count
        return {"residual_threshold": 0.0, "stop_on_duplicate_support": False,
                "max_iterations": self.options.max_inference_steps or self.k}

    def saelens_caveat(self) -> str:
        if self.options.stop_residual == 0:
            return ""
        return (f"stop_residual={self.options.stop_residual} stops a token once ||r|| <= stop_residual * ||x - b_dec||; "
                "SAELens' residual_threshold is an absolute norm, so the export runs max_iterations steps for "
                "every token (no early stop)")
