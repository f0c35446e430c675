"""Machinery shared by the SAE variants (see README.md in this folder for the math).

- Exact batch-level selections built on the fused TopK kernel (`kernels.topk_encode`), so that
  nothing of size batch x n_latents is ever stored:
    * `batch_topk_select`: the k*B largest relu pre-activations of the whole batch (per-token
      candidates from the kernel, widened until provably exact);
    * `threshold_select`: every latent with pre > threshold (scalar or per latent), by shifting
      the kernel's bias by the threshold (a JumpReLU forward);
    * `feature_topm_select`: the m largest pre-activations of each *latent* over the batch, by
      calling the kernel on the transposed problem (latents as rows, tokens as columns).
- Padded per-token layouts (`compact`, `rows_from_pairs`): variable numbers of active latents
  per token are returned as [B, width] values/indices padded with zeros (value 0 = unused slot).
- `RunningThreshold` (BatchTopK-style inference thresholds); `DensityTracker` and
  `zipf_underused` (Mutual/Feature Choice's aux_zipf loss on under-utilised latents).
- `VariantSAE`: base class of the variants (transcoder support, the training batch).
"""

from __future__ import annotations

import torch

import kernels
from framework.errors import ConfigError
from framework.sae import TopKSAE


def require(cond: bool, msg: str) -> None:
    """Options validation: fail with a ConfigError naming the key."""
    if not cond:
        raise ConfigError(msg)


# ----------------------------------------------------------------------------- layouts


def compact(values: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pack the kept entries of each row; width = the largest kept count (at least 1).
    Dropped and padding slots get value 0 and index 0. Differentiable in `values`."""
    width = max(1, int(keep.sum(1).max())) if keep.numel() else 1
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    kept = keep.gather(1, order)
    v = values.gather(1, order)
    i = indices.gather(1, order)
    return torch.where(kept, v, torch.zeros((), dtype=v.dtype, device=v.device)), torch.where(kept, i, torch.zeros_like(i))


def coalesce(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge repeated latents of a row into one slot (values summed), so every count of active
    latents (L0, firing counters, densities) sees each latent once. Freed slots get value 0 and
    index 0. Differentiable in `values`; the decode of the result is the same sum."""
    sorted_idx, order = indices.sort(dim=1, stable=True)
    new = torch.ones_like(sorted_idx, dtype=torch.bool)
    new[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    slot = new.long().cumsum(1) - 1  # position of each entry's group
    merged = torch.zeros_like(values).scatter_add(1, slot, values.gather(1, order))
    merged_idx = torch.zeros_like(indices).scatter(1, slot, sorted_idx)
    width = int(slot.max()) + 1 if slot.numel() else 1
    return merged[:, :width], merged_idx[:, :width]


def rows_from_pairs(token: torch.Tensor, latent: torch.Tensor, value: torch.Tensor,
                    n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, latent, value) triples -> per-token padded [n_tokens, width] values/indices."""
    order = torch.argsort(token, stable=True)
    token, latent, value = token[order], latent[order], value[order]
    counts = torch.bincount(token, minlength=n_tokens)
    width = max(1, int(counts.max())) if token.numel() else 1
    starts = counts.cumsum(0) - counts
    pos = torch.arange(token.numel(), device=token.device) - starts[token]
    vals = value.new_zeros(n_tokens, width).index_put((token, pos), value)
    idx = torch.zeros(n_tokens, width, dtype=torch.long, device=token.device).index_put((token, pos), latent)
    return vals, idx


# ----------------------------------------------------------------------------- selections


def batch_topk_select(x, encoder_weight, encoder_bias, offset, per_token: int, start_width: int):
    """The per_token * B largest relu pre-activations over the whole batch (BatchTopK).

    A token's selected latents are among its own top-w candidates as long as its w-th candidate
    is not above the global cut; the kernel is re-run with a doubled w until that holds (or
    w = n_latents). Returns padded (values [B, w'], indices [B, w']); gradient flows only
    through the selected entries."""
    B, n = x.shape[0], encoder_weight.shape[0]
    total = per_token * B
    width = max(1, min(n, start_width))
    while True:
        values, indices = kernels.topk_encode(x, encoder_weight, encoder_bias, offset, width)
        score = values.detach()
        flat = score.reshape(-1)
        take = min(total, flat.numel())
        cut = flat.kthvalue(flat.numel() - take + 1).values  # the take-th largest (selection, no sort)
        if width >= n or not bool((score.min(1).values > cut).any()):
            break
        width = min(n, 2 * width)
    keep = (score >= cut) & (score > 0)  # ties at the cut (measure zero for positive values) are all kept
    return compact(values, indices, keep)


def select_above(x, encoder_weight, encoder_bias, offset, cut: torch.Tensor, start_width: int):
    """Every (token, latent) with pre > cut (scalar or [n_latents], any sign): the kernel
    selects by pre - cut (bias shifted). Exact: the width doubles until some candidate of every
    row is not above its cut. Returns (pre - cut [B, w], indices [B, w], keep [B, w]);
    gradient flows through the kept entries only."""
    n = encoder_weight.shape[0]
    cut = cut.to(encoder_bias.dtype).expand(n)
    width = max(1, min(n, start_width))
    while True:
        shifted, indices = kernels.topk_encode(x, encoder_weight, encoder_bias - cut, offset, width)
        keep = shifted.detach() > 0
        if width >= n or not bool(keep.all(1).any()):
            return shifted, indices, keep
        width = min(n, 2 * width)


def threshold_select(x, encoder_weight, encoder_bias, offset, threshold: torch.Tensor, start_width: int):
    """All latents with pre > threshold (threshold >= 0, scalar or [n_latents]), values with
    the threshold added back (a JumpReLU forward), left-packed."""
    theta = threshold.to(encoder_bias.dtype).clamp_min(0).expand(encoder_weight.shape[0])
    shifted, indices, keep = select_above(x, encoder_weight, encoder_bias, offset, theta, start_width)
    return compact(shifted + theta[indices], indices, keep)


def feature_topm_select(x, encoder_weight, encoder_bias, offset, m: int | torch.Tensor):
    """Each latent keeps its m largest relu pre-activations over the batch (Feature Choice).

    The fused kernel runs on the transposed problem: rows are latents [W_enc | b_enc], columns
    are tokens [x - offset | 1], so pre^T is never stored. `m` may be a per-latent tensor of
    capacities: latents are then bucketed by capacity (powers of two) and each bucket runs the
    kernel with its largest capacity as width, so the work stays ~ 2 * sum(m), not n * max(m)."""
    B, n = x.shape[0], encoder_weight.shape[0]
    xa = torch.cat([x - offset, x.new_ones(B, 1)], 1)
    wa = torch.cat([encoder_weight, encoder_bias[:, None]], 1)
    zeros_b, zeros_d = xa.new_zeros(B), xa.new_zeros(xa.shape[1])
    if not torch.is_tensor(m):
        values, tokens = kernels.topk_encode(wa, xa, zeros_b, zeros_d, max(1, min(B, int(m))))
        keep = values.detach() > 0
        latent = torch.arange(n, device=x.device)[:, None].expand_as(tokens)
        return rows_from_pairs(tokens[keep], latent[keep], values[keep], B)
    caps = m.to(x.device).clamp(1, B)
    bucket = torch.log2(caps.double()).ceil().long()
    toks, lats, vals = [], [], []
    for b in bucket.unique().tolist():
        ids = (bucket == b).nonzero().squeeze(1)
        width = int(caps[ids].max())
        values, tokens = kernels.topk_encode(wa[ids], xa, zeros_b, zeros_d, width)
        order = values.detach().argsort(1, descending=True)
        values, tokens = values.gather(1, order), tokens.gather(1, order)
        keep = (values.detach() > 0) & (torch.arange(width, device=x.device) < caps[ids][:, None])
        toks.append(tokens[keep])
        lats.append(ids[:, None].expand_as(tokens)[keep])
        vals.append(values[keep])
    return rows_from_pairs(torch.cat(toks), torch.cat(lats), torch.cat(vals), B)


# ----------------------------------------------------------------------------- running state


class RunningThreshold(torch.nn.Module):
    """Bias-corrected EMA (as Adam's moments) of the smallest selected value, one scalar or one
    per latent (a latent's EMA only advances on batches where it was selected). Buffers, so
    checkpoints carry it."""

    def __init__(self, n_latents: int, per_latent: bool, beta: float):
        super().__init__()
        self.per_latent, self.beta = per_latent, beta
        shape = (n_latents,) if per_latent else ()
        self.register_buffer("ema", torch.zeros(shape))
        self.register_buffer("count", torch.zeros(shape))  # observations so far (inf once loaded)

    @property
    def ready(self) -> bool:
        return bool((self.count > 0).any())

    @torch.no_grad()
    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        active = values > 0
        if not bool(active.any()):
            return
        if self.per_latent:
            obs = torch.full_like(self.ema, float("inf")).scatter_reduce(
                0, indices[active], values[active].to(self.ema.dtype), reduce="amin")
            hit = torch.isfinite(obs)
            self.ema.copy_(torch.where(hit, self.beta * self.ema + (1 - self.beta) * obs, self.ema))
            self.count += hit.to(self.count.dtype)
        else:
            obs = values[active].min().to(self.ema.dtype)
            self.ema.mul_(self.beta).add_((1 - self.beta) * obs)
            self.count += 1

    def threshold(self) -> torch.Tensor:
        """The threshold to apply; latents never selected get +inf (they never fire)."""
        seen = self.count > 0
        corrected = self.ema / (1 - torch.pow(torch.full_like(self.count, self.beta), self.count)).clamp_min(1e-30)
        return torch.where(seen, corrected, torch.full_like(self.ema, float("inf")))

    def load(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.ema.copy_(value if self.per_latent else value.reshape(-1)[0])
            self.count.fill_(float("inf"))  # correction factor 1: the value is the estimate


class DensityTracker(torch.nn.Module):
    """EMA of each latent's firing frequency per token (bias-corrected), for aux_zipf."""

    def __init__(self, n_latents: int, beta: float):
        super().__init__()
        self.beta = beta
        self.register_buffer("ema", torch.zeros(n_latents, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices[values != 0], minlength=self.ema.numel()).double()
        self.ema.mul_(self.beta).add_(counts / max(1, values.shape[0]), alpha=1 - self.beta)
        self.steps += 1

    def density(self) -> torch.Tensor:
        return self.ema / (1 - self.beta ** max(1, int(self.steps)))


def zipf_underused(density: torch.Tensor, fraction: float, fit_fraction: float = 0.5) -> torch.Tensor:
    """Latents firing less than `fraction` x the density a Zipf law predicts at their rank.

    The law log p(r) = a - s log r is fitted (least squares) on the top `fit_fraction` of ranks
    with non-zero density, where feature densities do follow Zipf; the lower tail that falls
    under the extrapolated line is the under-utilised ("dying") set. Dead latents (density 0)
    are always in it, so with fraction -> 0 this is AuxK's dead set."""
    n = density.numel()
    sorted_d, order = density.sort(descending=True)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=density.device)
    fit = (sorted_d > 0) & (ranks <= max(2, int(n * fit_fraction)))
    if int(fit.sum()) < 2:
        return density <= 0
    lx, ly = ranks[fit].log(), sorted_d[fit].log()
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).pow(2).sum().clamp_min(1e-12)
    expected_sorted = (ly.mean() + slope * (ranks.log() - lx.mean())).exp()
    expected = torch.empty_like(expected_sorted).scatter_(0, order, expected_sorted)
    return density < fraction * expected


# ----------------------------------------------------------------------------- base class


class VariantSAE(TopKSAE):
    """TopKSAE plus the check that a kind that cannot be a transcoder is not built as one."""

    def __init__(self, d_in, n_latents, k, d_out=None, seed=0, options=None):
        super().__init__(d_in, n_latents, k, d_out=d_out, seed=seed, options=options)
        if self.is_transcoder and not self.supports_transcoder:
            raise ConfigError(f"SAE kind '{type(self).__name__}' cannot be a transcoder (output_site set): "
                              "its selection lives in the input space it reconstructs")


def default_width(k: int, factor: int, n_latents: int) -> int:
    return max(1, min(n_latents, factor * k))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["VariantSAE", "batch_topk_select", "select_above", "threshold_select", "feature_topm_select", "compact", "coalesce",
           "rows_from_pairs", "RunningThreshold", "DensityTracker", "zipf_underused", "require", "default_width",
           "ceil_div"]
