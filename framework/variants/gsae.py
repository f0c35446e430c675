"""Gradient SAEs (g-SAE; Olmo et al., "Features that Make a Difference"): TopK selection that
also weighs each latent by how much its decoder direction moves the LLM's loss.

    score_j = relu(pre_j) * (1 + beta * |<W_dec[j], g>|),   g = d(LM loss) / d(activation)

The k latents with the largest score are active, with their ordinary values relu(pre_j); the
gradient only changes *which* latents are chosen. Without a gradient (inference, or a source
that provides none) the selection is plain TopK, and the export is SAELens `topk`.

The LLM source computes the gradient (framework/lm_grads.py: one full forward and an
activation-only backward) and the trainer hands it to the forward with the batch; see README.md
in this folder for the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from framework.sae import SAE_KINDS, SAEOutput
from framework.variants.common import VariantSAE, require


@dataclass
class GSAEOptions:
    beta: float = 1.0  # weight of the gradient term in the selection score
    normalize_grad: bool = True  # rescale g so that its RMS norm over the batch is 1 (makes beta unit-free)
    use_grad_at_inference: bool = False  # in eval mode, use a gradient if one was given (default: plain TopK)
    latent_chunk: int = 4096  # latents per tile of the (unfused) scoring pass

    def __post_init__(self):
        require(self.beta >= 0, "options.beta: must be >= 0")
        require(self.latent_chunk >= 1, "options.latent_chunk: must be >= 1")


@torch.no_grad()
def gradient_topk_indices(x_centered, encoder_weight, encoder_bias, decoder_weight, grad, k: int, beta: float,
                          chunk: int = 4096) -> torch.Tensor:
    """[B, k] indices of the largest relu(pre) * (1 + beta |grad . W_dec[j]|), tile by tile over
    latents with a running top-k (B x chunk at a time, never B x n)."""
    n = encoder_weight.shape[0]
    best_s = best_i = None
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        pre = torch.addmm(encoder_bias[start:end], x_centered, encoder_weight[start:end].T)
        score = pre.clamp_min(0) * (1 + beta * (grad @ decoder_weight[start:end].T).abs())
        s, i = score.topk(min(k, end - start), dim=1)
        i = i + start
        if best_s is not None:
            s, pos = torch.cat([best_s, s], 1).topk(k, dim=1)
            i = torch.cat([best_i, i], 1).gather(1, pos)
        best_s, best_i = s, i
    return best_i


@SAE_KINDS.register("gsae")
class GradientSAE(VariantSAE):
    """TopK whose selection is tilted towards latents that move the LLM's loss (see module doc).
    The gradient comes with the training batch (`TrainingBatch.lm_grad`, normalised units);
    without one the step is plain TopK."""

    Options = GSAEOptions
    export_architecture = "topk"
    needs_lm_grad = True  # capability: the train loop hands it d(LM loss)/d(activation)

    def forward(self, x: torch.Tensor, k: int | None = None, batch=None) -> SAEOutput:
        k = k or self.k
        grad = batch.lm_grad if batch is not None else None
        if grad is not None and grad.shape[0] != x.shape[0]:
            raise ValueError(f"gsae: gradient rows {grad.shape[0]} != batch rows {x.shape[0]}")
        use = grad is not None and (self.training or self.options.use_grad_at_inference) and self.options.beta > 0
        if not use:
            values, indices = self.encode(x, k)
        else:
            g = grad.detach().to(x.dtype)
            if self.options.normalize_grad:  # by the RMS norm over the global batch (all ranks)
                sq, n = batch.global_sum(torch.stack([g.pow(2).sum().double(), g.new_tensor(g.shape[0]).double()]))
                g = g / (sq / n.clamp_min(1)).sqrt().to(g.dtype).clamp_min(1e-20)
            offset = self.input_offset()
            idx = gradient_topk_indices((x - offset).detach(), self.encoder_weight.detach(), self.encoder_bias.detach(),
                                        self.decoder_weight.detach(), g, min(k, self.n_latents), self.options.beta,
                                        self.options.latent_chunk)
            values, indices = kernels.encode_at(x, self.encoder_weight, self.encoder_bias, offset, idx), idx
        return SAEOutput(self.decode(values, indices), values, indices)
