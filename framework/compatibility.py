"""Which checkpoints resume under the current run, and how: the checkpoint's format, the
layout that wrote it (world size, strategy, placement) and its config against the current ones.

Supported transitions (`compatibility`):
  same world size, strategy and placement      exact: bitwise on CPU (ddp, zero1/2/3, layer)
  another strategy (ddp <-> zeroN, zeroN ->    elastic: weights, fp32 master weights, Adam moments,
  zeroM), same world size and placement        step, lr/schedule and dead-latent counters exact
                                               (re-sharded, or converted between torch's and
                                               ZeRO's layout); the data streams, mixing buffers
                                               and RNG continue exactly (they do not depend on the
                                               strategy)
  another world size and/or placement, any     elastic: the same state exact; the data streams go
  strategies                                   on from the furthest document/chunk any rank reached
                                               (nothing repeats, a few may be skipped); mixing
                                               buffers and packer leftovers start empty
  zero* with placement layer                   refused (config validation rejects it too)
  formats 2 and 3 (older versions)             refused without being opened: their optimizer state
                                               was pickled (DeepSpeed's checkpoints; torch.save)
                                               or laid out otherwise
Config changes that would make the saved state meaningless (data, batch/buffer sizes, seed, SAE
shapes) are refused; others (e.g. a longer token budget) are reported and applied.
"""

from __future__ import annotations

from framework.errors import CheckpointError

# 4: components' shared and per-rank state in safetensors + JSON (framework/stateful.py).
# 3: a ddp optimizer in a torch.save archive; 2: ZeRO state in DeepSpeed's own pickled folders.
FORMAT = 4

# Config keys whose change makes the saved state meaningless (data order, shapes, optimizer).
MUST_MATCH = ["model.name", "data.source", "data.paths", "data.text_field", "data.tokens_field", "data.split",
              "data.context_size", "data.prepend_bos", "data.separator", "data.exclude_special_tokens",
              "data.llm_batch_size", "data.shuffle_files", "data.activations_dir", "data.store_dir",
              "data.shuffle_rows", "train.batch_size",
              "train.buffer_tokens", "train.seed", "train.optimizer", "dist.latent_shards"]
SAE_MUST_MATCH = ["name", "site", "output_site", "kind", "n_latents", "options", "skip_connection"]
# an SAE key a checkpoint's config lacks (added since it was written) compares as this default
SAE_KEY_DEFAULTS = {"skip_connection": False}
# the same for run keys
KEY_DEFAULTS = {"data.store_dir": "", "data.shuffle_rows": True, "train.exchange_tokens": False}


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out |= _flatten(v, key + ".")
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(blocking, harmless) differences between a checkpoint's config and the current one."""
    blocking, harmless = [], []
    saved_saes, current_saes = saved.get("saes", []), current.get("saes", [])
    if len(saved_saes) != len(current_saes):
        blocking.append(f"saes: {len(saved_saes)} SAEs in the checkpoint, {len(current_saes)} now")
    for i, (a, b) in enumerate(zip(saved_saes, current_saes)):
        for key in a.keys() | b.keys():
            old, new = a.get(key, SAE_KEY_DEFAULTS.get(key)), b.get(key, SAE_KEY_DEFAULTS.get(key))
            if old != new:
                (blocking if key in SAE_MUST_MATCH else harmless).append(f"saes.{i}.{key}: {old!r} -> {new!r}")
    flat_a = _flatten({k: v for k, v in saved.items() if k not in ("saes", "run_dir")})
    flat_b = _flatten({k: v for k, v in current.items() if k not in ("saes", "run_dir")})
    for key in sorted(flat_a.keys() | flat_b.keys()):
        old, new = flat_a.get(key, KEY_DEFAULTS.get(key)), flat_b.get(key, KEY_DEFAULTS.get(key))
        if old != new and key != "train.resume":
            (blocking if key in MUST_MATCH else harmless).append(f"{key}: {old!r} -> {new!r}")
    return blocking, harmless


def check_format(manifest: dict) -> None:
    """Format FORMAT only; a checkpoint with a pickle in it is refused without being opened."""
    fmt = manifest.get("format")
    if fmt == FORMAT:
        return
    where = f"checkpoint {manifest.get('name', '')} (format {fmt}, {manifest['strategy']})"
    pickled = (fmt == 2 and manifest["strategy"] != "ddp", fmt in (2, 3) and manifest["strategy"] == "ddp")
    if pickled[0] or pickled[1]:
        what = "DeepSpeed checkpoint" if pickled[0] else "optimizer file (<sae>.optim.pt)"
        why = f"its {what} is a pickle, which this version never opens"
    else:
        why = f"this version reads format {FORMAT}"
    raise CheckpointError(f"{where} cannot resume: {why}. Resume it with the sparsemill version that wrote it, or "
                          "start fresh with --no-resume (`sparsemill export` still reads its weights).")


def compatibility(manifest: dict, world: int, strategy: str, placement: str) -> str:
    """How a checkpoint resumes under this layout: "exact" (same world size, strategy and
    placement) or "elastic" (anything else: the optimizer state is converted and re-sharded,
    so weights, optimizer moments, step, schedule and dead-latent counters are exact; the data
    streams continue exactly if only the strategy changed, otherwise from the furthest
    document/chunk any rank had reached with empty mixing buffers). Raises for checkpoints of
    another format and for layouts that cannot exist (ZeRO shards an SAE over the ranks that
    train it; layer placement trains each SAE whole on one rank)."""
    old = (manifest["world_size"], manifest["strategy"], manifest["sae_placement"])
    check_format(manifest)
    for s, p in (old[1:], (strategy, placement)):
        if s.startswith("zero") and p == "layer":
            raise CheckpointError(f"checkpoint written by {old[1]}/{old[2]} on {old[0]} rank(s) cannot resume as "
                                  f"{strategy}/{placement} on {world} rank(s): ZeRO does not combine with "
                                  "dist.sae_placement=layer")
    return "exact" if old == (world, strategy, placement) else "elastic"
