"""Chooses the implementation of each sparse op: Triton for CUDA tensors (and for CPU
tensors under TRITON_INTERPRET=1), the PyTorch reference otherwise."""

from __future__ import annotations

import os

import torch

from kernels import reference


def _triton_backend():
    """The Triton module if it can run on these tensors' device, else None."""
    try:
        from kernels import triton_ops  # noqa: PLC0415  (optional: needs triton)
    except ImportError:
        return None
    return triton_ops


def backend_for(t: torch.Tensor, requested: str = "auto"):
    if requested == "torch":
        return reference
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if requested == "triton" or t.is_cuda or interpret:
        mod = _triton_backend()
        if mod is not None and (t.is_cuda or interpret):
            return mod
        if requested == "triton":
            raise RuntimeError(
                "kernel backend 'triton' was requested but Triton cannot run here "
                "(needs a CUDA tensor, or TRITON_INTERPRET=1 set before import, and triton installed)"
            )
    return reference


def _determinism_kwargs(mod, deterministic):
    """Only the Triton backend has a choice: its scatters use atomics unless deterministic.
    The reference is deterministic on CPU; on CUDA it follows torch's own setting."""
    if mod is reference:
        return {}
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return {"deterministic": deterministic}


def topk_encode(
    x, encoder_weight, encoder_bias, b_dec, k, *, use_abs=False, latent_mask=None, backend="auto", deterministic=None
):
    """(values [B, k], indices [B, k]) of the k largest relu(pre) (or |pre| keeping the sign
    with use_abs), pre = (x - b_dec) @ encoder_weight^T + encoder_bias. Differentiable in
    x, encoder_weight, encoder_bias and b_dec; nothing of size B x n_latents is stored.
    deterministic=None follows torch.are_deterministic_algorithms_enabled()."""
    mod = backend_for(x, backend)
    return mod.topk_encode(
        x, encoder_weight, encoder_bias, b_dec, k, use_abs=use_abs, latent_mask=latent_mask,
        **_determinism_kwargs(mod, deterministic),
    )


def sparse_decode(values, indices, decoder_weight, *, backend="auto", deterministic=None):
    """sum_j values[:, j] * decoder_weight[indices[:, j]] (no bias). Differentiable in
    values and decoder_weight."""
    mod = backend_for(values, backend)
    return mod.sparse_decode(values, indices, decoder_weight, **_determinism_kwargs(mod, deterministic))
