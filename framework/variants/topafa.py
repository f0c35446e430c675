"""top-AFA (Lee et al., "Evaluating and Designing Sparse Autoencoders by Approximating
Quasi-Orthogonality"): the number of active latents per token is chosen by matching the norm
of the sparse code to the approximate feature activation ||x - b_dec||, with no fixed k.
Math: framework/variants/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.sae import SAE_KINDS, SAEOutput
from framework.variants.common import VariantSAE, compact, require


@dataclass
class TopAFAOptions:
    max_k: int = 0  # cap on active latents per token (the candidate width); 0 = 4 x the config's k
    afa_coef: float = 0.0  # weight of the AFA loss (||z|| - ||x - b_dec||)^2 / var (0 = off, as the authors' default)

    def __post_init__(self):
        require(self.max_k >= 0, "options.max_k: must be >= 0")
        require(self.afa_coef >= 0, "options.afa_coef: must be >= 0")


def afa_counts(sorted_values: torch.Tensor, row_norms: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """Per token, the j (1-based) minimising | sqrt(sum_{i<=j} (v_i ||d_i||)^2) - target |
    over values sorted in decreasing order (the norm-matching rule)."""
    cum = (sorted_values * row_norms).pow(2).cumsum(1).sqrt()
    return (cum - target_norm[:, None]).abs().argmin(1) + 1


@SAE_KINDS.register("topafa")
class TopAFASAE(VariantSAE):
    """Keeps, per token, the largest relu pre-activations until the code's norm best matches
    ||x - b_dec|| (at most max_k). The config's k only sets the default max_k."""

    Options = TopAFAOptions
    variable_l0 = True
    export_architecture = "top_afa"  # no SAELens equivalent: loadable by framework.export.load_exported only
    supports_transcoder = False  # the rule matches the code's norm to the input's own norm

    def max_width(self) -> int:
        return min(self.n_latents, self.options.max_k or 4 * self.k)

    def forward(self, x: torch.Tensor, k: int | None = None, batch=None) -> SAEOutput:
        width = self.max_width()
        values, indices = self.encode(x, width)  # the fused kernel: top-width relu pre-activations
        order = values.detach().argsort(1, descending=True)
        values, indices = values.gather(1, order), indices.gather(1, order)
        row_norms = self.decoder_weight.detach().norm(dim=1)[indices]
        centred = x - self.input_offset()
        target_norm = centred.detach().norm(dim=1)
        counts = afa_counts(values.detach(), row_norms, target_norm)
        keep = (torch.arange(width, device=x.device) < counts[:, None]) & (values.detach() > 0)
        values, indices = compact(values, indices, keep)
        out = SAEOutput(self.decode(values, indices), values, indices)
        if self.training and self.options.afa_coef > 0:
            code_norm = (values * self.decoder_weight.norm(dim=1)[indices]).pow(2).sum(1).clamp_min(1e-12).sqrt()
            var = self.training_batch(x, batch).centered_sum_sq(x)  # over the global batch
            out.losses["afa"] = self.options.afa_coef * (code_norm - target_norm).pow(2).sum() / var
        return out
