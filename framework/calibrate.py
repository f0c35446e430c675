"""The closest SAELens option for an export that no SAELens architecture computes (a TopK or
AbsTopK transcoder, top-AFA, ...): a JumpReLU with one threshold per latent, calibrated on
held-out activations so that each latent fires on as many of them as it does in ours (its
threshold is its (c_j + 1)-th largest pre-activation, c_j its firing count). The error of the
approximation against our function is measured on other held-out tokens and written into the
folder's metadata, because it depends on the data: it is not a bound.

AbsTopK codes can be negative, which no JumpReLU outputs: its approximation has 2n latents,
latent j and its mirror n + j (encoder, bias and decoder negated), calibrated on the positive and
the negative codes of j respectively.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from framework import export
from framework.errors import DataError
from framework.kinds import build_sae
from framework.sae import TopKSAE

METHOD = "per-latent thresholds: the (c_j+1)-th largest pre-activation of latent j, c_j its firing count in ours"
LATENT_CHUNK = 1024  # latents sorted at a time (tokens x chunk floats)


def _signs(sae: TopKSAE) -> tuple[int, ...]:
    """The approximation's latent blocks: j (positive codes), and for AbsTopK j's mirror (negative)."""
    return (1, -1) if sae.use_abs else (1,)


def pre_activations(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """Dense [B, n * len(signs)] pre-activations of the approximation's latents (raw units)."""
    pre = torch.addmm(sae.encoder_bias, x - sae.input_offset(), sae.encoder_weight.T)
    return torch.cat([sign * pre for sign in _signs(sae)], 1)


@torch.no_grad()
def firing_counts(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """Per approximation latent, on how many rows of `x` ours has a code of that latent's sign."""
    out = sae.eval()(x)
    return torch.cat([torch.bincount(out.indices[out.values * sign > 0], minlength=sae.n_latents)
                      for sign in _signs(sae)])


@torch.no_grad()
def calibrated_thresholds(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """Thresholds with which each latent fires (pre > theta_j) on as many rows of `x` as in ours."""
    counts = firing_counts(sae, x).clamp(max=x.shape[0] - 1)
    pre = pre_activations(sae, x)
    theta = torch.empty(pre.shape[1])
    for start in range(0, pre.shape[1], LATENT_CHUNK):
        cols = pre[:, start:start + LATENT_CHUNK].sort(0, descending=True).values
        theta[start:start + LATENT_CHUNK] = cols.gather(0, counts[None, start:start + LATENT_CHUNK]).squeeze(0)
    return theta.clamp_min(1e-12)  # SAELens' JumpReLU also applies a ReLU: a threshold below 0 acts as 0


def jumprelu_like(sae: TopKSAE, theta: torch.Tensor) -> TopKSAE:
    """A sparsemill JumpReLU module with `sae`'s weights (raw units) and thresholds `theta`."""
    signs = _signs(sae)
    jr = build_sae("jumprelu", sae.d_in, sae.n_latents * len(signs), sae.k,
                   d_out=sae.d_out if sae.is_transcoder else None, skip_connection=sae.has_skip)
    with torch.no_grad():
        for name in ("encoder_weight", "encoder_bias", "decoder_weight"):
            getattr(jr, name).copy_(torch.cat([sign * getattr(sae, name) for sign in signs]))
        jr.b_dec.copy_(sae.b_dec)
        if sae.has_skip:
            jr.skip.weight.copy_(sae.skip.weight)
        jr.load_export_extra({"threshold": theta})
    return jr.eval()


@torch.no_grad()
def relative_error(approx: TopKSAE, sae: TopKSAE, x: torch.Tensor) -> dict[str, float]:
    """FVU of the approximation's output against ours (the eval-set mean of ours), and both L0s."""
    mine, theirs = sae.eval()(x), approx(x)
    ref = mine.x_hat.double()
    err = (theirs.x_hat.double() - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum().clamp_min(1e-30)
    l0 = lambda out: float((out.values != 0).sum(1).double().mean())  # noqa: E731
    return {"relative_error": float(err), "l0_original": l0(mine), "l0_approximation": l0(theirs)}


def calibrate_folder(folder: str | Path, x: torch.Tensor, out: str | Path) -> dict:
    """Write `out`, the JumpReLU approximation of export `folder`, from held-out inputs `x` raw
    [N, d_in]: the first half calibrates, the second measures. Returns the measurement."""
    folder = Path(folder)
    cfg = json.loads((folder / export.CONFIG_FILE).read_text())
    sae = export.load_exported(folder).eval()
    if x.shape[0] < 4:
        raise DataError(f"calibrate {folder}: {x.shape[0]} held-out tokens; need at least 4")
    half = x.shape[0] // 2
    approx = jumprelu_like(sae, calibrated_thresholds(sae, x[:half]))
    measured = relative_error(approx, sae, x[half:]) | {
        "method": METHOD, "of_architecture": cfg["architecture"], "of_kind": cfg["metadata"].get("sparsemill_kind"),
        "calibration_tokens": half, "test_tokens": x.shape[0] - half}
    meta = {k: v for k, v in cfg["metadata"].items() if not k.startswith(("sparsemill_", "saelens_"))}
    export.export_sae(approx, Path(out), "jumprelu", meta | {"sparsemill_approximation": measured})
    return measured | {"folder": str(out), "architecture": export.export_architecture_name(approx)}


__all__ = ["calibrate_folder", "calibrated_thresholds", "jumprelu_like", "relative_error"]
