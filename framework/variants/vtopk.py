"""Variational TopK: the encoder's pre-activation is the mean of a Gaussian posterior
q(z_j | x) = N(mu_j(x), sigma_j^2) with a learned per-latent sigma; training samples
z = mu + sigma * eps (reparameterisation) before the TopK, and adds KL(q || N(0, 1)) of the
active latents with a coefficient. Inference uses z = mu (plain TopK; exports as `topk`).
Math and the candidate approximation: framework/variants/README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from framework.sae import SAE_KINDS, SAEOutput
from framework.variants.common import VariantSAE, default_width, require


@dataclass
class VTopKOptions:
    kl_coef: float = 0.01  # weight of sum_active KL(N(mu, sigma^2) || N(0, 1)) / batch variance
    sigma_init: float = 0.1  # initial posterior std (normalised units, where E||x||^2 = d_in)
    learn_sigma: bool = True  # learn one log-sigma per latent (else fixed at sigma_init)
    candidate_factor: int = 4  # noise is sampled for the top factor * k mean pre-activations per token

    def __post_init__(self):
        require(self.kl_coef >= 0, "options.kl_coef: must be >= 0")
        require(self.sigma_init > 0, "options.sigma_init: must be > 0")
        require(self.candidate_factor >= 1, "options.candidate_factor: must be >= 1")


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) elementwise."""
    return 0.5 * (torch.exp(2 * log_sigma) + mu.pow(2) - 1) - log_sigma


@SAE_KINDS.register("vtopk")
class VariationalTopKSAE(VariantSAE):
    Options = VTopKOptions
    export_architecture = "topk"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_sigma = nn.Parameter(torch.full((self.n_latents,), math.log(self.options.sigma_init)),
                                      requires_grad=self.options.learn_sigma)

    def forward(self, x: torch.Tensor, k: int | None = None, batch=None) -> SAEOutput:
        k = k or self.k
        if not self.training:
            values, indices = self.encode(x, k)
            return SAEOutput(self.decode(values, indices), values, indices)
        width = default_width(k, self.options.candidate_factor, self.n_latents)
        mu, cand = self.encode(x, width)  # relu'd means of the top-width candidates (fused kernel)
        log_sigma = self.log_sigma[cand]
        z = mu + torch.exp(log_sigma) * torch.randn_like(mu)
        pos = z.detach().topk(min(k, width), dim=1).indices
        values = z.gather(1, pos).clamp_min(0)
        indices = cand.gather(1, pos)
        out = SAEOutput(self.decode(values, indices), values, indices)
        if self.options.kl_coef > 0:
            active = (values.detach() > 0).to(mu.dtype)
            kl = (gaussian_kl(mu.gather(1, pos), log_sigma.gather(1, pos)) * active).sum()
            var = self.training_batch(x, batch).centered_sum_sq(x)  # over the global batch
            out.losses["kl"] = self.options.kl_coef * kl / var
        return out
