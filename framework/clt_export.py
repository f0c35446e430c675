"""Cross-layer transcoder export in circuit-tracer's CLT layout (safetensors + YAML/JSON), the
one format a CLT has: per spanned layer i (numbered from 0 in the range)

    W_enc_<i>.safetensors   W_enc_<i> [d_sae, d_model], b_enc_<i> [d_sae], b_dec_<i> [d_model]
    W_dec_<i>.safetensors   W_dec_<i> [d_sae, n_layers - i, d_model]
    config.yaml             model_kind: cross_layer_transcoder, hooks, model name (its cache loader)
    cfg.json                sparsemill's: kind, k, layers, options, training metadata

circuit-tracer computes f_i = act(W_enc_i x_i + b_enc_i), y_j = sum_{i<=j} f_i W_dec_i[:, j-i] +
b_dec_j on raw activations. Our per-layer scales fold as W_enc_i' = W_enc_i * input_scale_i
(TopK's choice is unchanged), W_dec_i'[:, j-i] = W_dec_i[:, j-i] / output_scale_j and
b_dec_j' = b_dec_j / output_scale_j: the codes stay in normalised units, shared by the targets.
A JumpReLU CLT (kind jumprelu_clt) adds `threshold_<i>` [d_sae] to W_enc_<i>.safetensors (codes,
hence thresholds, in normalised units); circuit-tracer's file loader then builds its own JumpReLU,
which is ours. From a TopK CLT it builds a ReLU, never a TopK: `circuit_tracer_clt` loads the
files through it and sets the TopK. Its replacement model indexes the CLT's layers from the
model's first: export CLTs spanning layers 0.. for attribution."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save

from framework import durable

CONFIG_FILE, CT_CONFIG_FILE, SPARSITY_FILE = "cfg.json", "config.yaml", "sparsity.safetensors"
INPUT_HOOK, OUTPUT_HOOK = "hook_resid_mid", "hook_mlp_out"  # circuit-tracer's names of our resid_mid / mlp_out


def folded_layers(sae) -> list[dict[str, torch.Tensor]]:
    """Per spanned layer, the tensors of its two files (raw units, float32, CPU)."""
    m, d, s_in, s_out = sae.per_layer, sae.d_model, sae.input_scale.detach().cpu(), sae.output_scale.detach().cpu()
    enc, b_enc, b_dec = sae.encoder_weight.detach().cpu(), sae.encoder_bias.detach().cpu(), sae.b_dec.detach().cpu()
    out = []
    for i in range(sae.n_layers):
        rows = slice(i * m, (i + 1) * m)
        dec = sae.decoders[i].detach().cpu() / s_out[i:, None]  # [m, n - i, d]: target j = i + t scaled by 1/s_out_j
        out.append({f"W_enc_{i}": (enc[rows] * s_in[i]).float().contiguous(), f"b_enc_{i}": b_enc[rows].float().contiguous(),
                    f"b_dec_{i}": (b_dec[i * d:(i + 1) * d] / s_out[i]).float().contiguous(),
                    f"W_dec_{i}": dec.float().contiguous(),
                    **{k: v.cpu().float().contiguous() for k, v in sae.clt_export_extra(i).items()}})
    return out


def export_clt(sae, folder: Path, kind: str, metadata: dict, log10_density: torch.Tensor | None = None) -> Path:
    """Write `sae` (a whole CrossLayerTranscoder) to `folder`, atomically (durable.publish_folder)."""
    folder = Path(folder)
    tmp = durable.fresh_tmp_folder(folder)
    for i, tensors in enumerate(folded_layers(sae)):
        durable.write_file(tmp / f"W_enc_{i}.safetensors", save({k: v for k, v in tensors.items() if k != f"W_dec_{i}"}))
        durable.write_file(tmp / f"W_dec_{i}.safetensors", save({f"W_dec_{i}": tensors[f"W_dec_{i}"]}))
    if log10_density is not None:
        durable.write_file(tmp / SPARSITY_FILE, save({"sparsity": log10_density.float().cpu().contiguous()}))
    durable.write_json(tmp / CONFIG_FILE, {
        "architecture": sae.export_architecture, "d_model": sae.d_model, "d_sae": sae.per_layer, "k": sae.k,
        "layers": sae.layers, "activation": sae.export_activation,
        "metadata": {"sparsemill_kind": kind, "sparsemill_options": dataclasses.asdict(sae.options), **metadata}})
    ct = {"model_kind": "cross_layer_transcoder", "model_name": metadata.get("model_name", ""),
          "feature_input_hook": INPUT_HOOK, "feature_output_hook": OUTPUT_HOOK, "scan": folder.name}
    durable.write_file(tmp / CT_CONFIG_FILE, yaml.safe_dump(ct, sort_keys=False).encode())
    durable.publish_folder(tmp, folder)
    return folder


def is_clt_export(folder: Path) -> bool:
    return (Path(folder) / CT_CONFIG_FILE).is_file() and (Path(folder) / "W_enc_0.safetensors").is_file()


def load_clt_export(folder: str | Path, build):
    """An exported CLT as a module in raw units (scales 1); `build(kind, d_in, n_latents, k,
    d_out, options)` makes the empty module (the kind registry lives in framework.kinds)."""
    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    n, d, m = len(cfg["layers"]), cfg["d_model"], cfg["d_sae"]
    meta = cfg["metadata"]
    sae = build(meta["sparsemill_kind"], n * d, m, cfg["k"], n * d, meta["sparsemill_options"])
    with torch.no_grad():
        for i in range(n):
            enc, dec = load_file(str(folder / f"W_enc_{i}.safetensors")), load_file(str(folder / f"W_dec_{i}.safetensors"))
            sae.encoder_weight[i * m:(i + 1) * m] = enc[f"W_enc_{i}"]
            sae.encoder_bias[i * m:(i + 1) * m] = enc[f"b_enc_{i}"]
            sae.b_dec[i * d:(i + 1) * d] = enc[f"b_dec_{i}"]
            sae.decoders[i].copy_(dec[f"W_dec_{i}"])
            sae.load_clt_export_extra(i, enc)
    return sae.eval()


def circuit_tracer_clt(folder: str | Path, device: str = "cpu"):
    """Our export loaded by circuit-tracer's own `load_clt` (float32, decoders in memory). A
    JumpReLU CLT is used as loaded; a TopK one gets what we compute: per layer and token
    TopK(k), then a ReLU (our TopK keeps only positive values)."""
    from circuit_tracer.transcoder.activation_functions import TopK  # noqa: PLC0415
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    clt = load_clt(str(folder), feature_input_hook=INPUT_HOOK, feature_output_hook=OUTPUT_HOOK, scan=folder.name,
                   device=torch.device(device), dtype=torch.float32, lazy_decoder=False)
    if cfg["activation"] == "topk":
        clt.activation_function = nn.Sequential(TopK(cfg["k"]), nn.ReLU())
    return clt
