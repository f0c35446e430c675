"""Optimizer state in one layout for every strategy, so any checkpoint resumes under any
other (ddp <-> zero1/2/3, any world size, latent shards) and nothing is ever pickled.

An SAE's optimizer state is saved as
    settings    (JSON, shared) param-group hyperparameters (lr...) and the scheduler's state
    pieces      each a (tensors, meta) pair: tensors `<param>.<key>` (exp_avg, exp_avg_sq,
                z, ...; `<param>.master` for ZeRO's fp32 master weights) hold a flat range of
                the parameter's flattened full tensor, and meta says, per parameter, its full
                shape, the range (start, numel), its step count and keys
A ZeRO run saves one piece per rank (its partition, in that rank's local state); a torch
optimizer (one process, ddp, latent shards gathered to the whole layout) saves one piece of
whole tensors, with the SAE's shared state. A reader (`SavedOptimizer`) takes from each piece
just the slices it needs. Torch pieces carry no `master`: the module's weights are the
master weights, and `SavedOptimizer` falls back to them.
"""

from __future__ import annotations

import math

import torch

from framework.errors import CheckpointError


def param_names(module, optimizer) -> list[str]:
    """The module's parameter names in the optimizer's order (the order of torch state dicts)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def settings(optimizer, scheduler) -> dict:
    """What every rank's optimizer shares, as JSON: param-group hyperparameters (lr included)
    and the scheduler's state."""
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    return {"param_groups": groups, "scheduler": scheduler.state_dict() if scheduler else None}


def apply_settings(optimizer, scheduler, saved: dict) -> None:
    groups = optimizer.param_groups
    if len(groups) != len(saved["param_groups"]):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, "
                              f"this one {len(groups)}")
    for group, values in zip(groups, saved["param_groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in values.items()})
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])


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
    tensors whatever layout wrote it. `pieces` are (meta, slice) pairs, slice(key, lo, hi)
    reading elements lo..hi of a piece's flat tensor `key`; `weights` (the module's saved
    weights, keyed by the optimizer's parameter names) stand in for master weights that a
    torch-optimizer piece does not store."""

    def __init__(self, settings: dict, pieces: list[tuple[dict, object]], weights: dict):
        if not pieces:
            raise CheckpointError("the checkpoint holds no optimizer state for this SAE")
        self.settings, self.weights, self.slices, self.params = settings, weights, [], {}
        for index, (meta, read) in enumerate(pieces):
            self.slices.append(read)
            for param, p in meta["params"].items():
                entry = self.params.setdefault(param, {**p, "pieces": []})
                entry["pieces"].append((index, p["start"], p["numel"]))
        first = pieces[0][0]
        self.counters = {k: first[k] for k in ("global_steps", "skipped_steps")}
        self.has_master = first.get("has_master", True)

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
                out[lo - start:hi - start] = self.slices[index](f"{name}.{key}", lo - first, hi - first)
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

    def torch_state(self, module, optimizer) -> dict:
        """A torch optimizer state dict for `optimizer` (over `module`'s parameters);
        hyperparameters and schedule are set separately (apply_settings)."""
        state = {}
        for i, name in enumerate(param_names(module, optimizer)):
            step, keys = self.step(name), self.keys(name)
            if step is None and not keys:  # saved before the first step
                continue
            shape = self.shape(name)
            entry = {k: self.read(name, k, 0, math.prod(shape)).view(shape) for k in keys}
            if step is not None:
                entry["step"] = torch.tensor(step, dtype=torch.float32)
            state[i] = entry
        return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
