"""SAELens v6 export (and import) of trained SAEs: safetensors + JSON, nothing pickled.

Training happens in normalised units (inputs times input_scale, targets times output_scale);
the export folds both constants into the weights so that the exported SAE maps raw
activations to raw reconstructions with unit-norm decoder rows:
    W_enc' = W_enc * input_scale / output_scale,  b_enc' = b_enc / output_scale,
    b_dec' = b_dec / output_scale,                W_dec' = W_dec.
(TopK selection is invariant to the positive factor 1/output_scale applied to every
pre-activation; the codes shrink by it and the reconstruction with them.)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from framework import durable
from framework.sae import SAE_KINDS, TopKSAE, parse_options

SAELENS_VERSION = "6.0.0"
WEIGHTS_FILE, CONFIG_FILE, SPARSITY_FILE = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"


def folded_tensors(sae: TopKSAE) -> dict[str, torch.Tensor]:
    s_in, s_out = sae.input_scale.item(), sae.output_scale.item()
    w = sae.decoder_weight.detach()
    extra = {k: v.detach().float().cpu().contiguous() for k, v in sae.export_extra(s_in, s_out).items()}
    return extra | {
        "W_enc": (sae.encoder_weight.detach() * (s_in / s_out)).T.contiguous().float().cpu(),
        "b_enc": (sae.encoder_bias.detach() / s_out).float().cpu(),
        "W_dec": (w / w.norm(dim=1, keepdim=True)).contiguous().float().cpu(),
        "b_dec": (sae.b_dec.detach() / s_out).float().cpu(),
    }


def export_sae(sae: TopKSAE, folder: Path, kind: str, metadata: dict, log10_density: torch.Tensor | None = None) -> Path:
    """Write `sae` (a whole SAE: latent shards are gathered first, see SAETrainer.full_sae) as
    one SAELens folder, atomically: the files go to a temporary folder, fsynced, which then
    replaces `folder` (a kill leaves the old export or the new one, never a mix)."""
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"export_sae needs a whole SAE, got a {type(sae).__name__}: gather latent shards first "
                        "(SAETrainer.evaluating(whole=True) or tensor_parallel.gather_full)")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    durable.write_file(tmp / WEIGHTS_FILE, save(folded_tensors(sae)))
    if log10_density is not None:
        durable.write_file(tmp / SPARSITY_FILE, save({"sparsity": log10_density.float().cpu().contiguous()}))
    cfg = {
        "architecture": sae.export_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.is_transcoder,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sparsemill_kind": kind,
                     "sparsemill_options": dataclasses.asdict(sae.options), **metadata},
    }
    if sae.is_transcoder:
        cfg["d_out"] = sae.d_out
    durable.write_json(tmp / CONFIG_FILE, cfg)
    durable.publish_folder(tmp, folder)
    return folder


def load_exported(folder: str | Path) -> TopKSAE:
    """An exported SAE as a module in raw units (scales 1): for checks and downstream use."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (not a SAELens export folder)")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    tensors = load_file(str(folder / WEIGHTS_FILE))
    kind = cfg.get("metadata", {}).get("sparsemill_kind", cfg["architecture"])
    if kind not in SAE_KINDS:
        raise ValueError(f"{folder / CONFIG_FILE}: unknown SAE kind '{kind}'; known: {sorted(SAE_KINDS)}")
    d_out = cfg.get("d_out")
    sae = SAE_KINDS[kind](cfg["d_in"], cfg["d_sae"], cfg["k"], d_out=d_out,
                          options=parse_options(kind, cfg.get("metadata", {}).get("sparsemill_options", {})))
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | set(sae.export_extra(1.0, 1.0))
    if set(tensors) != expected:
        raise ValueError(f"{folder / WEIGHTS_FILE}: tensors {sorted(tensors)}, expected {sorted(expected)}")
    with torch.no_grad():
        sae.encoder_weight.copy_(tensors.pop("W_enc").T)
        sae.encoder_bias.copy_(tensors.pop("b_enc"))
        sae.decoder_weight.copy_(tensors.pop("W_dec"))
        sae.b_dec.copy_(tensors.pop("b_dec"))
        sae.load_export_extra(tensors)
    return sae
