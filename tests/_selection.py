"""Comparing a top-k selection computed two ways, away from ties.

Two paths (float32 vs float64, another blocking on another CPU, a folded export) round
pre-activations differently, so a near-tie between the k-th and (k+1)-th score may go
either way. A difference is a bug only where the scores leave a margin."""

from __future__ import annotations

import torch


def topk_margin(dense_scores: torch.Tensor, k: int) -> float:
    """The smallest gap between a row's k-th and (k+1)-th score, relative to its largest: a
    property of the inputs, so a test can require its inputs to leave room for rounding."""
    scores = dense_scores.detach().double()
    if k >= scores.shape[1]:
        return float("inf")
    top = scores.topk(k + 1, dim=1).values
    return float(((top[:, k - 1] - top[:, k]) / top[:, 0].abs().clamp_min(1e-12)).min())


def assert_same_topk(indices: torch.Tensor, dense_scores: torch.Tensor, k: int, eps: float = 1e-5) -> torch.Tensor:
    """`indices` [B, k] must be the top-k of `dense_scores` [B, n] in every row whose k-th and
    (k+1)-th scores differ by more than eps (relative to the row's scale). Returns the mask of
    rows that agree (the caller compares values there)."""
    scores = dense_scores.detach().double()
    want = scores.topk(k, dim=1).indices.sort(1).values
    got = indices.sort(1).values
    agree = (got == want).all(1)
    if k < scores.shape[1]:
        top = scores.topk(k + 1, dim=1).values
        gap = (top[:, k - 1] - top[:, k]) / top[:, 0].abs().clamp_min(1e-12)
        assert (gap[~agree] < eps).all(), f"rows {(~agree).nonzero().flatten().tolist()} differ with gaps {gap[~agree]}"
    else:
        assert agree.all()
    return agree
