"""Chooses the implementation of each sparse op: Triton for CUDA tensors (and for CPU
tensors under TRITON_INTERPRET=1), the PyTorch reference otherwise.

Backend: the `backend=` argument, else env SPARSEMILL_KERNELS (auto | torch | triton), else
auto. CUDA tensors with a missing or broken Triton fail loudly instead of falling back to the
(slow on GPU) reference; `torch` is the explicit way to run the reference anywhere.

Compute dtype of the encoder matmul: `compute_dtype=`, else the autocast dtype when autocast is
enabled for the tensors' device (train.autocast: bfloat16), else the inputs' dtype. Only the
Triton backend uses it (bf16 tensor cores, fp32 accumulation, fp32 master weights); the CPU
reference keeps fp32, its fastest exact path. fp32 matmuls use TF32 on CUDA unless `tf32=False`
or env SPARSEMILL_TF32=0.
"""

from __future__ import annotations

import os

import torch

from kernels import reference

BACKENDS = ("auto", "torch", "triton")
_TRITON_ERROR: list[BaseException] = []  # why triton_ops failed to import (once per process)


def _triton_backend():
    """The Triton module, or None if it cannot be imported (the error is kept for messages)."""
    try:
        from kernels import triton_ops  # noqa: PLC0415  (optional: needs triton)
    except Exception as err:  # ImportError, or a broken install failing at import
        if not _TRITON_ERROR:
            _TRITON_ERROR.append(err)
        return None
    return triton_ops


def requested_backend(requested: str = "auto") -> str:
    if requested == "auto":
        requested = os.environ.get("SPARSEMILL_KERNELS", "auto") or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"kernel backend '{requested}' is not one of {list(BACKENDS)} "
                         "(argument backend= or env SPARSEMILL_KERNELS)")
    return requested


def backend_for(t: torch.Tensor, requested: str = "auto"):
    requested = requested_backend(requested)
    if requested == "torch":
        return reference
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if requested == "auto" and not (t.is_cuda or interpret):
        return reference
    mod = _triton_backend()
    if mod is not None and (t.is_cuda or interpret):
        return mod
    why = f"triton failed to import: {_TRITON_ERROR[0]!r}" if mod is None else (
        f"tensors are on {t.device} (Triton needs CUDA, or TRITON_INTERPRET=1 set before import)")
    raise RuntimeError(
        f"the Triton kernel backend cannot run ({why}). Install a working triton, or select the "
        "PyTorch reference explicitly with backend='torch' / SPARSEMILL_KERNELS=torch (slow on GPU)"
    )


def _determinism_kwargs(mod, deterministic):
    """Only the Triton backend has a choice: its scatters use atomics unless deterministic.
    The reference is deterministic on CPU; on CUDA it follows torch's own setting."""
    if mod is reference:
        return {}
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return {"deterministic": deterministic}


def compute_dtype_for(t: torch.Tensor, requested: torch.dtype | None = None) -> torch.dtype | None:
    """The encoder matmul's operand dtype: requested, else the active autocast dtype, else None
    (the inputs' own dtype)."""
    if requested is not None:
        return requested
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return None


def topk_encode(
    x, encoder_weight, encoder_bias, b_dec, k, *, use_abs=False, latent_mask=None, backend="auto", deterministic=None,
    compute_dtype=None, tf32=None,
):
    """(values [B, k], indices [B, k]) of the k largest relu(pre) (or |pre| keeping the sign
    with use_abs), pre = (x - b_dec) @ encoder_weight^T + encoder_bias. Differentiable in
    x, encoder_weight, encoder_bias and b_dec; nothing of size B x n_latents is stored.
    deterministic=None follows torch.are_deterministic_algorithms_enabled()."""
    mod = backend_for(x, backend)
    extra = {} if mod is reference else {"compute_dtype": compute_dtype_for(x, compute_dtype), "tf32": tf32}
    return mod.topk_encode(
        x, encoder_weight, encoder_bias, b_dec, k, use_abs=use_abs, latent_mask=latent_mask,
        **_determinism_kwargs(mod, deterministic), **extra,
    )


def topk_encode_with_aux(
    x, encoder_weight, encoder_bias, b_dec, k, aux_ids, k_aux, *, use_abs=False, backend="auto", deterministic=None,
    compute_dtype=None, tf32=None,
):
    """topk_encode plus AuxK's selection: (values, indices, aux_values, aux_indices), the aux
    pair being the k_aux largest (same scoring) among the latents `aux_ids` (ascending int64).
    On CPU both come from one pass over the pre-activation tiles, and one backward; the Triton
    backend encodes the aux latents' rows in a second call."""
    mod = backend_for(x, backend)
    if mod is reference:
        return reference.topk_encode_with_aux(x, encoder_weight, encoder_bias, b_dec, k, aux_ids, k_aux,
                                              use_abs=use_abs)
    options = {"use_abs": use_abs, "backend": backend, "deterministic": deterministic, "compute_dtype": compute_dtype,
               "tf32": tf32}
    values, indices = topk_encode(x, encoder_weight, encoder_bias, b_dec, k, **options)
    aux_values, sub = topk_encode(x, encoder_weight[aux_ids], encoder_bias[aux_ids], b_dec, k_aux, **options)
    return values, indices, aux_values, aux_ids[sub]


def encode_at(x, encoder_weight, encoder_bias, b_dec, indices, *, use_abs=False, backend="auto", deterministic=None):
    """relu(pre) (pre itself with use_abs) at the given [B, k] latent indices: the TopK encode's
    values and gradients for a selection made elsewhere (e.g. g-SAE's gradient-weighted one)."""
    mod = backend_for(x, backend)
    return mod.encode_at(x, encoder_weight, encoder_bias, b_dec, indices, use_abs=use_abs,
                         **_determinism_kwargs(mod, deterministic))


def sparse_decode(values, indices, decoder_weight, *, backend="auto", deterministic=None):
    """sum_j values[:, j] * decoder_weight[indices[:, j]] (no bias). Differentiable in
    values and decoder_weight."""
    mod = backend_for(values, backend)
    return mod.sparse_decode(values, indices, decoder_weight, **_determinism_kwargs(mod, deterministic))
