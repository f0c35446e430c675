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


def _is_zero(trainer) -> bool:
    return hasattr(trainer.stepper, "engine")


def save_checkpoint(root: Path, step: int, tokens: int, trainers: dict, extra: dict, keep: int, engine=None,
                    each_rank_writes: bool = False) -> Path:
    """Collective when distributed: every rank calls it. Rank 0 writes the replicated state
    (all but ZeRO shards); with each_rank_writes (layer-distributed SAEs) every rank writes
    the SAEs it owns. Rank 0 then publishes the folder."""
    is_main = engine is None or engine.is_main
    writes = is_main or each_rank_writes
    barrier = engine.barrier if engine is not None else (lambda: None)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    for name, tr in trainers.items():
        if _is_zero(tr):  # each rank writes its own optimizer-state partition
            tr.stepper.engine.save_checkpoint(str(tmp / f"{name}.zero"), tag="state", save_latest=False)
        with tr.stepper.gathered():
            tensors = {f"sae.{k}": v.detach().contiguous().cpu() for k, v in tr.sae.state_dict().items()}
        tensors["tokens_since_fired"] = tr.tokens_since_fired.cpu()
        if writes:
            save_file(tensors, str(tmp / f"{name}.safetensors"))
            if not _is_zero(tr):
                torch.save(tr.stepper.optimizer_state(), tmp / f"{name}.optim.pt")
    steps = {n: tr.step_count for n, tr in trainers.items()}
    if engine is not None and engine.world > 1 and each_rank_writes:
        parts = [None] * engine.world
        torch.distributed.all_gather_object(parts, steps)
        steps = {k: v for part in parts for k, v in part.items()}
    barrier()
    if is_main:
        save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {"step": step, "tokens": tokens, "world_size": engine.world if engine else 1,
                 "saes": steps, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        _prune(root, keep, final)
    barrier()
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
    """Restore trainers in place (same world size and strategy); returns state.json's content."""
    state = json.loads((path / "state.json").read_text())
    for name, tr in trainers.items():
        tensors = load_file(str(path / f"{name}.safetensors"))
        if _is_zero(tr):
            tr.stepper.engine.load_checkpoint(str(path / f"{name}.zero"), tag="state")
        else:
            tr.sae.load_state_dict({k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")})
            tr.stepper.load_optimizer_state(torch.load(path / f"{name}.optim.pt", weights_only=True))
        tr.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        tr.step_count = int(state["saes"][name])
    return state
