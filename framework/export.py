"""SAELens v6 export (and import) of trained SAEs: safetensors + JSON, nothing pickled.

Training happens in normalised units (inputs times input_scale, targets times output_scale);
the export folds both constants into the weights so that the exported SAE maps raw
activations to raw reconstructions with unit-norm decoder rows:
    W_enc' = W_enc * input_scale / output_scale,  b_enc' = b_enc / output_scale,
    b_dec' = b_dec / output_scale,                W_dec' = W_dec.
(TopK selection is invariant to the positive factor 1/output_scale applied to every
pre-activation; the codes shrink by it and the reconstruction with them.) A skip connection
folds as W_skip' = W_skip * input_scale / output_scale, a threshold as threshold / output_scale.

Every kind and role (SAE, transcoder, skip transcoder) exports under the SAELens architecture
that computes the same function (`SAELENS_ARCHITECTURES`); where SAELens 6.54 has none (a TopK
transcoder, top-AFA) the name is sparsemill's own (`topk_transcoder`, ...), so SAELens refuses the
folder instead of loading another function, cfg.json's metadata says so (`saelens_exact`,
`saelens_note`), `load_exported` reads it and framework/calibrate.py writes the closest SAELens
option. `export_circuit_tracer` writes circuit-tracer's transcoder-set
layout (one `layer_<L>.safetensors` per layer + `config.yaml`) from such folders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save

from framework import checkpoint, clt_export, durable, hooks
from framework.errors import CheckpointError
from framework.kinds import SAE_KINDS, build_sae, parse_options
from framework.sae import TopKSAE, with_skip
from framework.schema import RunConfig, build_dataclass

log = logging.getLogger("sparsemill")

SAELENS_VERSION = "6.0.0"
WEIGHTS_FILE, CONFIG_FILE, SPARSITY_FILE = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"


# (a kind's export_architecture, role) -> the SAELens 6.54 architecture computing the same
# function; role: "sae" | "transcoder" | "skip_transcoder". SAELens' transcoder / skip_transcoder
# are ReLU transcoders (no k) and it has no TopK transcoder: those roles have no entry.
SAELENS_ARCHITECTURES = {
    ("topk", "sae"): "topk",
    ("abstopk", "sae"): "abstopk",
    ("jumprelu", "sae"): "jumprelu",
    ("jumprelu", "transcoder"): "jumprelu_transcoder",
    ("jumprelu", "skip_transcoder"): "jumprelu_skip_transcoder",
    ("matching_pursuit", "sae"): "matching_pursuit",
}
NO_SAELENS_NOTE = ("no SAELens 6.54 architecture computes this function; SAELens refuses the folder and "
                   "framework.export.load_exported reads it. `sparsemill calibrate` writes the closest SAELens "
                   "option (JumpReLU with per-latent thresholds calibrated on held-out activations) and measures "
                   "its error")


def export_role(sae: TopKSAE) -> str:
    return "sae" if not sae.is_transcoder else ("skip_transcoder" if sae.has_skip else "transcoder")


def saelens_architecture(sae: TopKSAE) -> str | None:
    """The SAELens architecture computing `sae`'s inference function, or None."""
    return SAELENS_ARCHITECTURES.get((sae.export_architecture, export_role(sae)))


def export_architecture_name(sae: TopKSAE) -> str:
    """cfg.json's architecture: SAELens' where one computes the same function, else sparsemill's own
    name (e.g. `topk_transcoder`), which SAELens refuses instead of loading another function."""
    role = export_role(sae)
    return saelens_architecture(sae) or sae.export_architecture + ("" if role == "sae" else f"_{role}")


def folded_tensors(sae: TopKSAE) -> dict[str, torch.Tensor]:
    s_in, s_out = sae.input_scale.item(), sae.output_scale.item()
    w = sae.decoder_weight.detach()
    extra = {k: v.detach().float().cpu().contiguous() for k, v in sae.export_extra(s_in, s_out).items()}
    if sae.has_skip:
        extra["W_skip"] = (sae.skip.weight.detach() * (s_in / s_out)).float().cpu().contiguous()
    if sae.export_encoder:
        extra["W_enc"] = (sae.encoder_weight.detach() * (s_in / s_out)).T.contiguous().float().cpu()
        extra["b_enc"] = (sae.encoder_bias.detach() / s_out).float().cpu()
    return extra | {
        "W_dec": (w / w.norm(dim=1, keepdim=True)).contiguous().float().cpu(),
        "b_dec": (sae.b_dec.detach() / s_out).float().cpu(),
    }


def export_sae(sae, folder: Path, kind: str, metadata: dict, log10_density: torch.Tensor | None = None) -> Path:
    """Write `sae` in its kind's format (`export_format`: SAELens, or circuit-tracer's CLT layout)."""
    return EXPORT_FORMATS[sae.export_format](sae, folder, kind, metadata, log10_density)


def export_saelens(sae: TopKSAE, folder: Path, kind: str, metadata: dict,
                   log10_density: torch.Tensor | None = None) -> Path:
    """Write `sae` (a whole SAE: latent shards are gathered first, see SAETrainer.full_sae) as
    one SAELens folder, atomically: the files go to a temporary folder, fsynced, which then
    replaces `folder` (a kill leaves the old export or the new one, never a mix)."""
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"export_sae needs a whole SAE, got a {type(sae).__name__}: gather latent shards first "
                        "(SAETrainer.evaluating(whole=True) or tensor_parallel.gather_full)")
    folder = Path(folder)
    tmp = durable.fresh_tmp_folder(folder)
    durable.write_file(tmp / WEIGHTS_FILE, save(folded_tensors(sae)))
    if log10_density is not None:
        durable.write_file(tmp / SPARSITY_FILE, save({"sparsity": log10_density.float().cpu().contiguous()}))
    caveat = NO_SAELENS_NOTE if saelens_architecture(sae) is None else sae.saelens_caveat()
    cfg = {
        "architecture": export_architecture_name(sae),
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.is_transcoder,
        "normalize_activations": "none",
        # SAELens reshapes [.., n_heads, d_head] inputs of hook_z SAEs (our rows are the heads concatenated)
        "reshape_activations": "hook_z" if not sae.is_transcoder and _is_hook_z(metadata) else "none",
        **sae.export_config(),
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sparsemill_kind": kind,
                     "sparsemill_options": dataclasses.asdict(sae.options),
                     "sparsemill_skip_connection": sae.has_skip,
                     "saelens_exact": not caveat, **({"saelens_note": caveat} if caveat else {}), **metadata},
    }
    if sae.is_transcoder:
        cfg["d_out"] = sae.d_out
    durable.write_json(tmp / CONFIG_FILE, cfg)
    durable.publish_folder(tmp, folder)
    return folder


def _build_empty(kind: str, d_in: int, n_latents: int, k: int, d_out: int, options: dict):
    return build_sae(kind, d_in, n_latents, k, d_out=d_out, options=options)


def _is_hook_z(metadata: dict) -> bool:
    return str(metadata.get("hook_name") or "").endswith("hook_z")


def load_exported(folder: str | Path) -> TopKSAE:
    """An exported SAE as a module in raw units (scales 1): for checks and downstream use."""
    folder = Path(folder)
    if clt_export.is_clt_export(folder):
        return clt_export.load_clt_export(folder, _build_empty)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (not a SAELens export folder)")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    tensors = load_file(str(folder / WEIGHTS_FILE))
    kind = cfg.get("metadata", {}).get("sparsemill_kind", cfg["architecture"])
    if kind not in SAE_KINDS:
        raise ValueError(f"{folder / CONFIG_FILE}: unknown SAE kind '{kind}'; known: {sorted(SAE_KINDS)}")
    d_out = cfg.get("d_out")
    cls = with_skip(SAE_KINDS[kind]) if "W_skip" in tensors else SAE_KINDS[kind]
    sae = cls(cfg["d_in"], cfg["d_sae"], cfg["k"], d_out=d_out,
              options=parse_options(kind, cfg.get("metadata", {}).get("sparsemill_options", {})))
    expected = set(folded_tensors(sae))
    if set(tensors) != expected:
        raise ValueError(f"{folder / WEIGHTS_FILE}: tensors {sorted(tensors)}, expected {sorted(expected)}")
    with torch.no_grad():
        if sae.export_encoder:
            sae.encoder_weight.copy_(tensors.pop("W_enc").T)
            sae.encoder_bias.copy_(tensors.pop("b_enc"))
        sae.decoder_weight.copy_(tensors.pop("W_dec"))
        sae.b_dec.copy_(tensors.pop("b_dec"))
        if sae.has_skip:
            sae.skip.weight.copy_(tensors.pop("W_skip"))
        sae.load_export_extra(tensors)
    return sae


EXPORT_FORMATS = {"saelens": export_saelens, "clt": clt_export.export_clt}  # a kind's export_format -> writer


# ----------------------------------------------------------------------------- circuit-tracer

# (our input site kind, output site kind) -> circuit-tracer's hooks inside a block: its
# ReplacementModel wraps every MLP with hook_in (the MLP's input, after ln2: our mlp_in) and
# hook_out (the MLP's output: our mlp_out), and replaces each layer's MLP by a transcoder
CIRCUIT_TRACER_HOOKS = {("mlp_in", "mlp_out"): ("mlp.hook_in", "mlp.hook_out")}
# export architectures whose inference circuit-tracer 0.5's file loader reproduces: it builds a
# JumpReLU when `activation_function.threshold` is in the file, a ReLU otherwise (never TopK)
CIRCUIT_TRACER_FILE_ACTIVATIONS = {"jumprelu"}
CIRCUIT_TRACER_ACTIVATIONS = {"jumprelu", "topk"}  # in memory (circuit_tracer_set): TopK too
CIRCUIT_TRACER_CONFIG = "config.yaml"


def circuit_tracer_tensors(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """One layer's tensors in circuit-tracer's names and layouts (raw units): it computes
    relu/JumpReLU(x @ W_enc^T + b_enc) @ W_dec + b_dec + x @ W_skip^T, so W_enc is [d_sae, d_in]
    (transposed from SAELens') and no b_dec is subtracted from the input (transcoders only)."""
    t = folded_tensors(sae)
    out = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if "W_skip" in t:
        out["W_skip"] = t["W_skip"]
    if "threshold" in t:
        out["activation_function.threshold"] = t["threshold"]
    return out


def _circuit_tracer_layers(folders, file_format: bool) -> tuple[dict[int, TopKSAE], tuple[str, str], str]:
    """layer -> transcoder (raw units) from our export folders, checked for what circuit-tracer
    needs: MLP transcoders (mlp_in -> mlp_out of one layer, d_in = d_out), one per layer 0..L."""
    from framework import hooks  # noqa: PLC0415

    layers, hook_pairs, models = {}, set(), set()
    for folder in map(Path, folders):
        meta = json.loads((folder / CONFIG_FILE).read_text()).get("metadata", {})
        sae = load_exported(folder)
        if not sae.is_transcoder or sae.d_in != sae.d_out:
            raise ValueError(f"{folder}: circuit-tracer replaces MLPs with transcoders of equal input and output "
                             f"width; this is {'an SAE' if not sae.is_transcoder else f'{sae.d_in} -> {sae.d_out}'}")
        arch = sae.export_architecture
        if file_format and arch not in CIRCUIT_TRACER_FILE_ACTIVATIONS:
            raise ValueError(f"{folder}: circuit-tracer 0.5's loader reads ReLU or JumpReLU transcoders only and would "
                             f"load this '{arch}' one as a ReLU (another function); build it in memory with "
                             "framework.export.circuit_tracer_set instead")
        if arch not in CIRCUIT_TRACER_ACTIVATIONS or sae.use_abs:
            raise ValueError(f"{folder}: circuit-tracer has no activation computing '{meta.get('sparsemill_kind')}'")
        sites = [hooks.parse_site(meta.get(key) or "?", f"{folder}: metadata.{key}") for key in ("hook_name", "hook_name_out")]
        pair = CIRCUIT_TRACER_HOOKS.get((sites[0].kind, sites[1].kind))
        if pair is None or sites[0].layer != sites[1].layer:
            raise ValueError(f"{folder}: circuit-tracer transcoders map one layer's MLP input to its output "
                             f"({sorted(CIRCUIT_TRACER_HOOKS)}); this one maps {sites[0].name} -> {sites[1].name}")
        if sites[0].layer in layers:
            raise ValueError(f"{folder}: a second transcoder for layer {sites[0].layer}")
        layers[sites[0].layer] = sae
        hook_pairs.add(pair)
        models.add(meta.get("model_name", ""))
    missing = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
    if not layers or missing:
        raise ValueError(f"circuit-tracer needs a transcoder for every layer from 0 up: missing layers {missing or [0]}")
    if len(models) > 1:
        raise ValueError(f"transcoders of different models: {sorted(models)}")
    return layers, hook_pairs.pop(), models.pop()


def export_circuit_tracer(folders, out: str | Path, scan: str = "") -> Path:
    """circuit-tracer's transcoder-set folder from our SAELens export folders (one per layer):
    `layer_<L>.safetensors` + `config.yaml` (model_kind transcoder_set, hooks, model name), the
    layout its cache loader reads: `load_transcoders_from_cache(name, cache_dir=parent)`; each
    file alone loads with `load_relu_transcoder(path, layer)`."""
    import yaml  # noqa: PLC0415

    layers, (hook_in, hook_out), model_name = _circuit_tracer_layers(folders, file_format=True)
    out = Path(out)
    tmp = durable.fresh_tmp_folder(out)
    for layer, sae in sorted(layers.items()):
        durable.write_file(tmp / f"layer_{layer}.safetensors", save(circuit_tracer_tensors(sae)))
    config = {"model_kind": "transcoder_set", "model_name": model_name, "feature_input_hook": hook_in,
              "feature_output_hook": hook_out, "scan": scan or out.name}
    durable.write_file(tmp / CIRCUIT_TRACER_CONFIG, yaml.safe_dump(config, sort_keys=False).encode())
    durable.publish_folder(tmp, out)
    return out


def circuit_tracer_set(folders, scan: str = "", device: str = "cpu"):
    """Our export folders as a circuit-tracer `TranscoderSet` in memory (needs circuit-tracer).
    JumpReLU kinds as its loader would build them; TopK kinds too, which its file loader cannot
    express: circuit-tracer's TopK(k) followed by a ReLU, as our TopK zeroes non-positive values."""
    from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK  # noqa: PLC0415
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    layers, (hook_in, hook_out), _ = _circuit_tracer_layers(folders, file_format=False)
    built = {}
    for layer, sae in layers.items():
        tensors = circuit_tracer_tensors(sae)
        threshold = tensors.get("activation_function.threshold")
        act = JumpReLU(threshold.clone()) if threshold is not None else nn.Sequential(TopK(sae.k), nn.ReLU())
        tc = SingleLayerTranscoder(sae.d_in, sae.n_latents, act, layer, skip_connection="W_skip" in tensors,
                                   device=torch.device(device), dtype=torch.float32)
        tc.load_state_dict(tensors)
        built[layer] = tc
    return TranscoderSet(built, feature_input_hook=hook_in, feature_output_hook=hook_out, scan=scan or None)


# --------------------------------------------------------------------------- from checkpoints


def export_metadata(cfg, sae_cfg, tokens: int, sites: tuple[str, str] | None = None) -> dict:
    """SAELens metadata; `sites` are the (input, output) keys the SAE trained on (an activation
    file's single tensor when saes.N.site was left empty)."""
    site, output_site = sites or (sae_cfg.site, sae_cfg.output_site or sae_cfg.site)
    return {
        "model_name": cfg.model.name if cfg.data.source != "activations" else "",
        "hook_name": hooks.hook_name(site) if site else "",
        "hook_name_out": hooks.hook_name(output_site) if output_site and output_site != site else None,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": ",".join(cfg.data.paths) or cfg.data.activations_dir,
        "training_tokens": tokens,
    }


def _existing_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory '{run_dir}' does not exist" if not run_dir.exists()
                              else f"'{run_dir}' is not a run directory (not a folder)")
    return run_dir


def _resolve(run_dir: Path, name: str | None) -> tuple[Path, dict]:
    root = _existing_run_dir(run_dir) / "checkpoints"
    if name:
        path = root / name if (root / name).is_dir() else Path(name)
        if not path.is_dir():
            have = [p.name for p in checkpoint.list_checkpoints(root)]
            raise CheckpointError(f"no checkpoint '{name}' in {root} (have: {have})")
        return path, checkpoint.verify(path)
    found = checkpoint.newest_valid(root, lambda err: log.warning("checkpoint %s; using an older one", err))
    if found is None:
        raise CheckpointError(f"no valid checkpoint in {root}")
    return found


def export_checkpoint(run_dir: Path, name: str | None = None, out: Path | None = None) -> list[Path]:
    """SAELens folders (one per SAE) from a checkpoint of any strategy, placement or world
    size: its `<sae>.safetensors` hold gathered full tensors."""
    path, manifest = _resolve(run_dir, name)
    # not validated: the data may have moved since
    cfg = build_dataclass(RunConfig, yaml.safe_load((path / checkpoint.CONFIG).read_text()))
    out = Path(out) if out is not None else Path(run_dir) / "export" / path.name
    folders = []
    for s in cfg.saes:
        tensors = checkpoint.read_saved(path, s.name).shared.tensors
        tensors = {k: tensors[k] for k in tensors.keys()}
        prefix = "eval." if any(k.startswith("eval.") for k in tensors) else "sae."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        transcoder = bool(s.output_site) and s.output_site != s.site
        d_in, n_latents, d_out = SAE_KINDS[s.kind].shape_from_weights(weights, parse_options(s.kind, s.options),
                                                                      transcoder)
        sae = build_sae(s.kind, d_in, n_latents, s.k, d_out=d_out, options=s.options, skip_connection=s.skip_connection)
        sae.load_state_dict(weights)
        sae.eval()
        folders.append(export_sae(sae, out / s.name, s.kind, export_metadata(cfg, s, manifest["tokens"])))
    return folders


def inspect_run(run_dir: Path) -> list[dict]:
    """One row per checkpoint folder: name, step, tokens, validity, layout, eval metrics."""
    run_dir = _existing_run_dir(run_dir)
    root = run_dir / "checkpoints"
    latest = checkpoint.latest_name(root)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    rows = []
    for path in checkpoint.list_checkpoints(root):
        row = {"name": path.name, "step": checkpoint.step_of(path), "latest": path.name == latest}
        try:
            manifest = checkpoint.verify(path)
            row |= {"valid": True, "tokens": manifest["tokens"], "world_size": manifest["world_size"],
                    "strategy": manifest["strategy"], "sae_placement": manifest["sae_placement"],
                    "created": manifest["created"], "bytes": sum(f["size"] for f in manifest["files"].values())}
            state = json.loads((path / "state.json").read_text())
            if state.get("eval"):
                row["eval"] = state["eval"]
            if summary and summary.get("steps") == row["step"]:
                row["eval"] = {"step": row["step"], "metrics": summary["saes"], "final": True}
        except checkpoint.InvalidCheckpoint as err:
            row |= {"valid": False, "problem": str(err)}
        rows.append(row)
    for p in sorted(root.glob(".tmp_step_*")) if root.is_dir() else []:
        rows.append({"name": p.name, "step": checkpoint.step_of(p), "valid": False, "latest": False,
                     "problem": "unpublished save (in progress, or interrupted: ignored, removed by the next save)"})
    return rows


def format_inspection(run_dir: Path, rows: list[dict]) -> str:
    if not rows:
        return f"{run_dir}: no checkpoints"
    lines = [f"{run_dir}/checkpoints:"]
    for r in rows:
        mark = " <- latest" if r.get("latest") else ""
        if not r["valid"]:
            lines.append(f"  {r['name']}  INVALID: {r['problem']}{mark}")
            continue
        lines.append(f"  {r['name']}  step {r['step']:,}  tokens {r['tokens']:,}  valid  {r['strategy']}/"
                     f"{r['sae_placement']} x{r['world_size']}  {r['bytes'] / 2**20:.1f} MiB  {r['created']}{mark}")
        if "eval" in r:
            label = "final eval" if r["eval"].get("final") else f"eval at step {r['eval']['step']}"
            for name, m in r["eval"]["metrics"].items():
                parts = [f"{k}={m[k]:.4g}" for k in ("fvu", "l0", "dead_frac", "delta_ce", "ce_recovered") if k in m]
                lines.append(f"      {label}: {name}: {' '.join(parts)}")
    return "\n".join(lines)

