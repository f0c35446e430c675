"""SAELens-format folders (ours, or written by SAELens itself with `SAE.save_model`) evaluated
with our metrics on a config's model and held-out data (`sparsemill evaluate`), and calibrated
into the closest SAELens option where SAELens has no architecture (`sparsemill calibrate`).

A folder says where it reads in its metadata (`hook_name`, `hook_name_out` for transcoders:
TransformerLens names, which hooks.parse_site accepts). A folder whose architecture SAELens
knows is evaluated through SAELens (the function its users get); any other through
`export.load_exported` (sparsemill's own names). Either way the module answers like an
SAETrainer in inference mode, in raw units, so framework/evaluate.py runs unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from framework import export, hooks, placement
from framework.errors import ConfigError, DataError
from framework.evaluate import evaluate
from framework.sae import SAEOutput
from framework.schema import RunConfig, SAEConfig

log = logging.getLogger("sparsemill")


class SAELensModule(nn.Module):
    """A SAELens SAE as our modules answer: forward(x) -> SAEOutput with each row's nonzero codes
    (padded with zeros), raw units (normalisation and skip are SAELens' own business)."""

    has_skip = False  # its skip is inside its forward; skip_fvu is reported for our modules only
    output_layers = None  # one site (per-layer metrics are for our cross-layer transcoders)

    def __init__(self, sae):
        super().__init__()
        self.inner = sae
        if getattr(sae, "hook_z_reshaping_mode", False):  # our rows are the heads concatenated already
            sae.turn_off_forward_pass_hook_z_reshaping()
        self.n_latents, self.d_in = sae.cfg.d_sae, sae.cfg.d_in
        self.d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)

    def normalize_input(self, x):
        return x

    normalize_target = normalize_input

    def forward(self, x: torch.Tensor, k=None, batch=None) -> SAEOutput:
        acts = self.inner.encode(x.to(self.inner.dtype))
        width = max(1, int((acts != 0).sum(1).max()))
        idx = acts.abs().topk(width, dim=1).indices
        return SAEOutput(self.inner(x.to(self.inner.dtype)).float(), acts.gather(1, idx).float(), idx)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.inner.dtype)).float()

    def splice_predictor(self):
        """What evaluation splices in: raw input -> raw reconstruction (as our single-site SAEs)."""
        return self.reconstruct


@dataclasses.dataclass
class FolderSAE:
    """What evaluate.py asks of an SAETrainer, for a loaded folder."""

    name: str
    sae: nn.Module
    input_site: str
    output_site: str
    loaded_by: str  # "sae_lens" | "sparsemill"
    folder: str

    @property
    def tokens_since_fired(self) -> torch.Tensor:  # evaluate.py takes the device from it
        return torch.zeros(0)

    @contextmanager
    def evaluating(self, whole: bool = False):
        yield self.sae.eval()


def read_cfg(folder: Path) -> dict:
    for name in (export.CONFIG_FILE, export.WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise DataError(f"{folder}: missing {name} (not a SAELens-format folder)")
    try:
        return json.loads((folder / export.CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{folder / export.CONFIG_FILE}: not JSON ({err})") from None


def folder_sites(folder: Path, cfg: dict) -> tuple[str, str]:
    """(input site, output site) from the metadata's TransformerLens hook names."""
    meta = cfg.get("metadata") or {}
    hook_in, hook_out = meta.get("hook_name"), meta.get("hook_name_out") or meta.get("hook_name")
    if not hook_in:
        raise ConfigError(f"{folder / export.CONFIG_FILE}: metadata.hook_name is empty: the folder does not say "
                          "which activation it reads")
    specs = [hooks.parse_site(h, f"{folder / export.CONFIG_FILE}: metadata hook") for h in (hook_in, hook_out)]
    names = [s.name if s.kind == "module" else f"blocks.{s.layer}.{s.kind}" for s in specs]
    return names[0], names[1]


def load_folder(folder: str | Path, name: str) -> FolderSAE:
    from sae_lens import SAE  # noqa: PLC0415
    from sae_lens.registry import SAE_CLASS_REGISTRY  # noqa: PLC0415

    folder = Path(folder)
    cfg = read_cfg(folder)
    site, output_site = folder_sites(folder, cfg)
    if cfg.get("architecture") in SAE_CLASS_REGISTRY:
        module, by = SAELensModule(SAE.load_from_disk(str(folder), device="cpu")), "sae_lens"
    else:
        try:
            module, by = export.load_exported(folder), "sparsemill"
        except ValueError as err:
            raise DataError(f"{folder}: architecture '{cfg.get('architecture')}' is neither SAELens' "
                            f"({sorted(SAE_CLASS_REGISTRY)}) nor sparsemill's: {err}") from None
    return FolderSAE(name, module, site, output_site, by, str(folder))


def _names(folders) -> list[str]:
    names = [Path(f).name for f in folders]
    return [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]


def _source_for(cfg: RunConfig, loaded: dict[str, FolderSAE]):
    """The config's activation source capturing the folders' sites, on the CPU (evaluation only)."""
    cfg = dataclasses.replace(cfg, saes=[SAEConfig(name=n, site=f.input_site, output_site=f.output_site,
                                                   n_latents=f.sae.n_latents) for n, f in loaded.items()])
    source = placement.build_source(cfg, torch.device("cpu"))
    for n, f in loaded.items():
        for site, want in ((f.input_site, f.sae.d_in), (f.output_site, f.sae.d_out)):
            have = source.dims.get(site)
            if have is None:
                raise ConfigError(f"{f.folder}: reads '{site}', which the config's source does not provide "
                                  f"({sorted(source.dims)})")
            if have != want:
                raise DataError(f"{f.folder}: expects width {want} at {site}, the model '{cfg.model.name}' has {have}")
    return cfg, source


def evaluate_folders(cfg: RunConfig, folders) -> dict[str, dict]:
    """name -> our metrics (+ folder, loaded_by) for each folder on the config's held-out data."""
    loaded = {n: load_folder(f, n) for n, f in zip(_names(folders), folders)}
    for f in loaded.values():
        model = (read_cfg(Path(f.folder)).get("metadata") or {}).get("model_name")
        if model and model != cfg.model.name:
            log.warning("%s was trained on '%s'; evaluating it on '%s'", f.folder, model, cfg.model.name)
    cfg, source = _source_for(cfg, loaded)
    result = evaluate(source, loaded, cfg.eval.tokens, cfg.eval.splice_tokens, cfg.eval.splice)["metrics"]
    return {n: {"folder": f.folder, "loaded_by": f.loaded_by, **result[n]} for n, f in loaded.items()}


def held_out_inputs(source, site: str, n_tokens: int) -> torch.Tensor:
    rows, seen = [], 0
    for batch in source.batches("eval"):
        rows.append(batch[site][: n_tokens - seen].float())
        seen += rows[-1].shape[0]
        if seen >= n_tokens:
            break
    if not rows:
        raise DataError("the held-out split is empty: no tokens to calibrate on")
    return torch.cat(rows)


def calibrate_folders(cfg: RunConfig, folders, out: str | None = None) -> dict[str, dict]:
    """The JumpReLU approximation (framework/calibrate.py) of each folder, from eval.tokens held-out
    tokens of the config's data; written to OUT/<name> (default: beside the folder, `<name>_jumprelu`)."""
    from framework.calibrate import calibrate_folder  # noqa: PLC0415

    loaded = {n: load_folder(f, n) for n, f in zip(_names(folders), folders)}
    for f in loaded.values():
        if f.loaded_by != "sparsemill":
            raise ConfigError(f"{f.folder}: SAELens computes its '{read_cfg(Path(f.folder))['architecture']}' "
                              "exactly already; calibrate approximates sparsemill exports SAELens cannot load")
    cfg, source = _source_for(cfg, loaded)
    result = {}
    for n, f in loaded.items():
        target = Path(out) / n if out else Path(f.folder).with_name(f"{Path(f.folder).name}_jumprelu")
        result[n] = calibrate_folder(f.folder, held_out_inputs(source, f.input_site, cfg.eval.tokens), target)
    return result


def format_table(results: dict[str, dict], keys=("fvu", "l0", "dead_frac", "dense_frac", "delta_ce", "kl",
                                                 "ce_recovered")) -> str:
    rows = [["name", "loaded by", *keys]]
    for n, m in results.items():
        rows.append([n, m.get("loaded_by", ""), *(f"{m[k]:.4g}" if k in m else "-" for k in keys)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
