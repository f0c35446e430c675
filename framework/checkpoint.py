"""Single-process checkpoints of the full training state.

Layout: RUN_DIR/checkpoints/step_00001234/{state.json, <sae>.safetensors, <sae>.optim.pt,
rng.safetensors} and RUN_DIR/checkpoints/latest (the name of the newest complete one).
A checkpoint is written into a temporary folder and renamed, and `latest` changes last, so a
crash leaves the previous checkpoint loadable. Optimizer state is a plain tensor dict loaded
with torch.load(weights_only=True): a checkpoint cannot run code. (The ZeRO-aware, exactly
resumable state manager replaces this module behind the same save/load calls.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _tensor_state(trainer) -> dict[str, torch.Tensor]:
    out = {f"sae.{k}": v.detach().contiguous().cpu() for k, v in trainer.sae.state_dict().items()}
    out["tokens_since_fired"] = trainer.tokens_since_fired.cpu()
    return out


def save_checkpoint(root: Path, step: int, tokens: int, trainers: dict, extra: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, tr in trainers.items():
        save_file(_tensor_state(tr), str(tmp / f"{name}.safetensors"))
        torch.save(tr.stepper.state_dict(), tmp / f"{name}.optim.pt")
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state = {"step": step, "tokens": tokens, "saes": {n: tr.step_count for n, tr in trainers.items()}, **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, trainers: dict) -> dict:
    """Restore trainers in place; returns state.json's content."""
    state = json.loads((path / "state.json").read_text())
    for name, tr in trainers.items():
        tensors = load_file(str(path / f"{name}.safetensors"))
        sae_state = {k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")}
        tr.load_state_dict({
            "sae": sae_state,
            "stepper": torch.load(path / f"{name}.optim.pt", weights_only=True),
            "tokens_since_fired": tensors["tokens_since_fired"],
            "step_count": state["saes"][name],
        })
    return state
