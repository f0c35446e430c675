"""Optimizer state on disk in one layout for every strategy, so any checkpoint resumes under
any other (ddp <-> zero1/2/3, any world size) and nothing is ever pickled.

Per SAE a checkpoint holds
    <sae>.optim.json                  the settings every rank shares: param-group
                                      hyperparameters (lr...), the scheduler's state, and the
                                      number of piece files
    <sae>.optim.rank_R.safetensors    tensors `<param>.<key>` (exp_avg, exp_avg_sq, z, ...;
                                      `<param>.master` for ZeRO's fp32 master weights)
    <sae>.optim.rank_R.json           per parameter: full shape, which flat range of it the
                                      piece holds (start, numel), its step count and keys
A ZeRO run writes one piece file per rank (its partition); a torch optimizer (ddp, one
process, latent shards gathered to the whole layout) writes one piece holding each tensor
whole. A reader takes just the slices it needs from each file. ddp pieces carry no `master`:
the module's weights are the master weights, and `SavedOptimizer` falls back to them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from framework.errors import CheckpointError

SETTINGS_SUFFIX = "optim.json"


def piece_base(sae: str, index: int) -> str:
    return f"{sae}.optim.rank_{index:05d}"


def param_names(runner) -> list[str]:
    """The runner's parameter names in its optimizer's order (the order of torch state dicts)."""
    names = {id(p): n for n, p in runner.module.named_parameters()}
    return [names[id(p)] for group in runner.optimizer.param_groups for p in group["params"]]


def settings(runner, pieces: int) -> dict:
    """What every rank's optimizer shares, as JSON: param-group hyperparameters (lr included),
    the scheduler's state, and how many piece files were written."""
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
              for g in runner.optimizer.param_groups]
    return {"world": pieces, "param_groups": groups,
            "scheduler": runner.scheduler.state_dict() if runner.scheduler else None}


def apply_settings(runner, saved: dict) -> None:
    groups = runner.optimizer.param_groups
    if len(groups) != len(saved["param_groups"]):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, "
                              f"this one {len(groups)}")
    for group, values in zip(groups, saved["param_groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in values.items()})
    if runner.scheduler is not None and saved["scheduler"] is not None:
        runner.scheduler.load_state_dict(saved["scheduler"])


def torch_pieces(optimizer_state: dict, names: list[str], global_steps: int) -> tuple[dict, dict]:
    """(tensors, meta) of one piece holding every parameter's state whole, from a torch
    optimizer's state_dict (parameters in `names` order)."""
    tensors, params = {}, {}
    for i, name in enumerate(names):
        state = optimizer_state["state"].get(i, {})
        keys = []
        for key, value in state.items():
            if key == "step":
                continue
            if not torch.is_tensor(value) or value.dim() == 0:
                raise CheckpointError(f"optimizer state '{key}' of parameter {name} is not a tensor ({value!r}); "
                                      "only tensor state can be saved")
            tensors[f"{name}.{key}"] = value.detach().to("cpu").reshape(-1).contiguous()  # flat, as ZeRO pieces
            keys.append(key)
        shape = list(next((v.shape for k, v in state.items() if k != "step"), ()))
        step = float(state["step"]) if "step" in state else None
        params[name] = {"shape": shape, "start": 0, "numel": math.prod(shape), "step": step, "keys": sorted(keys)}
    return tensors, {"params": params, "global_steps": global_steps, "skipped_steps": 0, "has_master": False}


class SavedOptimizer:
    """One SAE's saved optimizer state, read as ranges of each parameter's flattened full
    tensors whatever layout wrote it. `weights` (the checkpoint's module weights) stand in for
    master weights that a torch-optimizer checkpoint does not store; their keys are the
    optimizer's parameter names (the training objective's: `sae.<param>`)."""

    def __init__(self, path: Path, sae: str, weights: dict[str, torch.Tensor]):
        settings_file = path / f"{sae}.{SETTINGS_SUFFIX}"
        if not settings_file.is_file():
            raise CheckpointError(f"{path.name}: no optimizer state for SAE '{sae}' ({settings_file.name} missing)")
        self.settings = json.loads(settings_file.read_text())
        self.weights = weights
        self.files, self.params = [], {}
        for index in range(self.settings["world"]):
            base = piece_base(sae, index)
            meta = json.loads((path / f"{base}.json").read_text())
            self.files.append(path / f"{base}.safetensors")
            for param, p in meta["params"].items():
                entry = self.params.setdefault(param, {**p, "pieces": []})
                entry["pieces"].append((index, p["start"], p["numel"]))
            if index == 0:
                self.counters = {k: meta[k] for k in ("global_steps", "skipped_steps")}
                self.has_master = meta.get("has_master", True)

    def _param(self, name: str) -> dict:
        if name not in self.params:
            raise CheckpointError(f"the checkpoint has no optimizer state for parameter {name} "
                                  f"(it has {sorted(self.params)})")
        return self.params[name]

    def shape(self, name: str) -> list[int]:
        return list(self.weights[name].shape) if name in self.weights else self._param(name)["shape"]

    def step(self, name: str) -> float | None:
        return self._param(name)["step"]

    def keys(self, name: str) -> list[str]:
        return self._param(name)["keys"]

    def read(self, name: str, key: str, start: int, numel: int) -> torch.Tensor:
        """Elements start..start+numel of the flattened full tensor `<name>.<key>` (fp32)."""
        if key == "master" and not self.has_master:
            return self.weights[name].reshape(-1)[start:start + numel].float()
        out, filled = torch.empty(numel), 0
        for index, first, count in self._param(name)["pieces"]:
            lo, hi = max(start, first), min(start + numel, first + count)
            if lo < hi:
                with safe_open(str(self.files[index]), framework="pt") as f:
                    out[lo - start:hi - start] = f.get_slice(f"{name}.{key}")[lo - first:hi - first]
                filled += hi - lo
        if filled != numel:
            raise CheckpointError(f"{name}.{key}: the saved pieces cover {filled} of elements {start}..{start + numel}")
        return out

    def whole(self) -> dict[str, dict[str, torch.Tensor]]:
        """param -> {key: full tensor} of every saved state key (and "step"), for inspection."""
        out = {}
        for name, p in self.params.items():
            out[name] = {k: self.read(name, k, 0, p["numel"]).view(p["shape"]) for k in p["keys"]}
            if p["step"] is not None:
                out[name]["step"] = torch.tensor(p["step"])
        return out

    def torch_state(self, runner) -> dict:
        """A torch optimizer state dict for `runner`; hyperparameters and schedule are set
        separately (apply_settings)."""
        state = {}
        for i, name in enumerate(param_names(runner)):
            step, keys = self.step(name), self.keys(name)
            if step is None and not keys:  # saved before the first step
                continue
            shape = self.shape(name)
            entry = {k: self.read(name, k, 0, math.prod(shape)).view(shape) for k in keys}
            if step is not None:
                entry["step"] = torch.tensor(step, dtype=torch.float32)
            state[i] = entry
        return {"state": state, "param_groups": runner.optimizer.state_dict()["param_groups"]}
