"""The objective's pieces, written once: the normalised MSE (FVU of a batch), AuxK, and
`TrainingBatch`, what a kind's training forward receives besides its input. (The decoder
rows' radial-gradient projection is a kernel: kernels.project_out_radial.)

Data-parallel exactness: a batch may be split over ranks. Every loss here is this rank's
*share* of the global batch's loss (its numerator over the global normaliser, or its sum over
the global token count), so the shares summed over the ranks are the one-process loss, and
the engine's gradient averaging (x world) yields its exact gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # in-place sum over the ranks that split the batch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def centered_sum_sq(y: torch.Tensor, reduce: Reduce = _local) -> torch.Tensor:
    """sum ||y - mean(y)||^2 over the global batch (one all-reduce of d + 2 doubles)."""
    y = y.detach().double()
    stats = torch.cat([y.sum(0), y.pow(2).sum().reshape(1), y.new_tensor([y.shape[0]])])
    stats = reduce(stats)
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    return (sq - total.pow(2).sum() / n.clamp_min(1)).clamp_min(1e-12).float()


def normalized_mse(pred: torch.Tensor, target: torch.Tensor, reduce: Reduce = _local,
                   normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """||target - pred||^2 / ||target - mean(target)||^2: this rank's share of the global
    batch's FVU (`normaliser`: that denominator, when already known)."""
    denom = normaliser if normaliser is not None else centered_sum_sq(target, reduce)
    return (pred - target).pow(2).sum() / denom


@dataclass(frozen=True)
class AuxRequest:
    """AuxK's selection, known before the forward (the dead latents are counted at step start),
    so that a kind's encode can make it in the same pass over the pre-activations as its own
    (TopK's fused CPU encode does): the top `k` among `latent_ids` (ascending) per token."""

    latent_ids: torch.Tensor
    k: int


@dataclass
class TrainingBatch:
    """What a kind's training forward gets with its input (inference passes None): the target
    in normalised units (an SAE's is its input), d(LM loss)/d(activation) for kinds that need
    it, and the reduction over the ranks that split the batch, with the losses built on it."""

    target: torch.Tensor | None
    lm_grad: torch.Tensor | None = None
    reduce: Reduce = _local
    aux_request: AuxRequest | None = None
    _normalisers: dict = field(default_factory=dict, repr=False)

    def centered_sum_sq(self, t: torch.Tensor) -> torch.Tensor:
        """Global centred sum of squares of `t`, reduced once per tensor per batch."""
        key = id(t)
        if key not in self._normalisers:
            self._normalisers[key] = (t, centered_sum_sq(t, self.reduce))  # t kept: its id stays unique
        return self._normalisers[key][1]

    def normalized_mse(self, pred: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = self.target if target is None else target
        if target is None:
            raise ValueError("a transcoder's training losses need its target: pass forward(x, k, "
                             "batch=TrainingBatch(target=y))")
        return normalized_mse(pred, target, normaliser=self.centered_sum_sq(target))

    def mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global batch's mean of a per-token quantity."""
        count = self.reduce(torch.tensor([float(per_token.shape[0])], device=per_token.device))
        return per_token.sum() / count[0].clamp_min(1)

    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """A (non-differentiable) statistic summed over the ranks, e.g. gsae's gradient RMS."""
        return self.reduce(t.detach().clone())


def aux_k_loss(sae, x: torch.Tensor, residual: torch.Tensor, latent_ids: torch.Tensor, k_aux: int,
               batch: TrainingBatch, selection: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """AuxK (Gao et al. 2024) on a latent subset (the dead latents; aux_zipf: the under-used
    ones): their top k_aux pre-activations per token predict the (detached) residual the
    active latents left, decoded WITHOUT b_dec, scaled by min(|subset| / k_aux, 1).
    `selection`: (values, latent ids) of that top k_aux when the forward's encode made it
    (SAEOutput.aux_selection); else only the subset's encoder rows are multiplied here
    (`sae.encode_rows`: B*d*|subset|, and latent shards select among their own rows globally)."""
    if selection is None:
        selection = sae.encode_rows(x, latent_ids, aux_k_take(k_aux, latent_ids))
    values, ids = selection
    e_hat = sae.decode(values, ids, with_bias=False)
    return min(latent_ids.numel() / k_aux, 1.0) * batch.normalized_mse(e_hat, residual)


def aux_k_take(k_aux: int, latent_ids: torch.Tensor) -> int:
    """How many of the subset AuxK decodes per token."""
    return min(k_aux, latent_ids.numel())
