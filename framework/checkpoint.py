"""The state manager: atomic, verified checkpoints of everything a run needs to continue
exactly, and their export and inspection.

Layout of RUN_DIR/checkpoints/:
    step_00001234/
      manifest.json           every other file with size and sha256; world size, strategy, placement
      state.json              step, tokens, per-SAE step counts, logger position, last eval
      config.yaml             the resolved run config
      <sae>.safetensors       gathered full weights `sae.*` (normalisation constants included), the
                              dead-latent counters and fire counts (+ `eval.*`: schedule-free eval weights)
      <sae>.optim.pt          ddp: optimizer + scheduler state dicts and the parameter names
                              (torch.load weights_only)
      <sae>.optim.json        zero1/2/3: world size, param-group hyperparameters (lr...), scheduler state
      <sae>.optim.rank_00000.safetensors / .json
                              zero1/2/3, per rank: its own pieces of each parameter's flattened fp32
                              master weights and Adam moments (`<param>.master|exp_avg|exp_avg_sq`), and
                              per parameter its full shape, step count and which elements the piece holds
      rank_00000.safetensors  per rank: mixing buffer (rows + generator), torch/numpy RNG, metric sums
      rank_00000.json         per rank: data position, python RNG, skip counters
    latest                    name of the newest published checkpoint

Saving is collective (every rank calls it at the same step). Everything goes into
`.tmp_step_N/`; every file is fsynced as it is written; rank 0 then hashes the files into the
manifest, fsyncs the directories, renames the folder to `step_N` and only then rewrites
`latest` (itself via a temporary file and a rename). Old checkpoints are pruned after that,
so the last good checkpoint is never removed before a new one is complete. A failed write
(e.g. ENOSPC) on any rank removes the temporary folder on all and raises CheckpointError.

Resuming picks the newest checkpoint whose manifest checks out (every file present, of the
right size and sha256) and falls back to older ones, saying why. Config changes that would
make the saved state meaningless (data, batch/buffer sizes, seed, SAE shapes) are refused;
others (e.g. a longer token budget) are reported and applied.

Nothing is ever unpickled: tensors are safetensors, the rest JSON/YAML, and ddp's torch state
dicts are read with torch.load(weights_only=True) (tensors and plain containers only). ZeRO state
is read from DeepSpeed's partitions and written back into them directly (ZeroRunner.
optimizer_partition / load_optimizer_partition), never through DeepSpeed's own pickled
checkpoints; on load a ZeRO rank reads just the slices of the saved pieces it now holds.

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
  format 2 (older versions) with zero*         refused: DeepSpeed pickles; ddp format 2 resumes as ddp
`sparsemill export` works from any checkpoint: its `<sae>.safetensors` hold full tensors.

Test hook: SPARSEMILL_SAVE_DELAY=<seconds> sleeps after each file this module writes, so a
kill can be made to land in the middle of a save.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save

log = logging.getLogger("sparsemill")

LATEST, MANIFEST, STATE, CONFIG = "latest", "manifest.json", "state.json", "config.yaml"
FORMAT = 3  # 2: ZeRO optimizer state in DeepSpeed's own (pickled) checkpoint folders
DDP_OPTIM, ZERO_OPTIM = "optim.pt", "optim.json"  # per SAE: `<sae>.optim.pt` (ddp), `<sae>.optim.json` (zero)
SAVE_DELAY_ENV = "SPARSEMILL_SAVE_DELAY"

# Config keys whose change makes the saved state meaningless (data order, shapes, optimizer).
MUST_MATCH = ["model.name", "data.source", "data.paths", "data.text_field", "data.tokens_field", "data.split",
              "data.context_size", "data.prepend_bos", "data.separator", "data.exclude_special_tokens",
              "data.llm_batch_size", "data.shuffle_files", "data.activations_dir", "train.batch_size",
              "train.buffer_tokens", "train.seed", "train.optimizer", "dist.latent_shards"]
SAE_MUST_MATCH = ["name", "site", "output_site", "kind", "n_latents", "options", "skip_connection"]
# an SAE key a checkpoint's config lacks (added since it was written) compares as this default
SAE_KEY_DEFAULTS = {"skip_connection": False}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or cannot be resumed from."""


class InvalidCheckpoint(CheckpointError):
    """A checkpoint folder failed its manifest check."""


# --------------------------------------------------------------------------- files


def _write_file(path: Path, data: bytes) -> None:
    """Every file this module writes goes through here: written, flushed and fsynced."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)


def _write_json(path: Path, obj) -> None:
    _write_file(path, json.dumps(obj, indent=2).encode())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=step_of)


def verify(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; InvalidCheckpoint naming the problem otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise InvalidCheckpoint(f"{path.name}: no {MANIFEST} (an interrupted save, or written by an older version)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise InvalidCheckpoint(f"{path.name}: {MANIFEST} is unreadable ({err})") from None
    for rel, expected in files.items():
        f = path / rel
        if not f.is_file():
            raise InvalidCheckpoint(f"{path.name}: file {rel} is missing")
        size = f.stat().st_size
        if size != expected["size"]:
            what = "truncated" if size < expected["size"] else "the wrong size"
            raise InvalidCheckpoint(f"{path.name}: file {rel} is {what} ({size} bytes, manifest says {expected['size']})")
        if _hash_file(f)["sha256"] != expected["sha256"]:
            raise InvalidCheckpoint(f"{path.name}: file {rel} fails its sha256 check (corrupted)")
    return manifest


def newest_valid(root: Path, warn=None) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; each invalid newer one is passed to `warn`."""
    for path in reversed(list_checkpoints(root)):
        try:
            return path, verify(path)
        except InvalidCheckpoint as err:
            if warn is not None:
                warn(err)
    return None


def latest_checkpoint(root: Path) -> Path | None:
    found = newest_valid(Path(root))
    return found[0] if found else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def _rank_name(rank: int) -> str:
    return f"rank_{rank:05d}"


def _is_zero(trainer) -> bool:
    return hasattr(trainer.stepper, "engine")


def _has_eval_mode(trainer) -> bool:
    opt = trainer.stepper.optimizer
    return not _is_zero(trainer) and hasattr(opt, "eval") and hasattr(opt, "train")


# --------------------------------------------------------------------------- trainer state


@contextmanager
def training_weights_kept(trainers):
    """Schedule-free optimizers evaluate by moving the weights to their averaged point and back,
    which is not bitwise reversible: keep a copy and restore it, so that evaluation, export and
    checkpoints never change the training trajectory."""
    params = [p for tr in trainers if _has_eval_mode(tr) for p in tr.sae.parameters()]
    kept = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


def _trainer_tensors(tr) -> dict[str, torch.Tensor]:
    """Collective under ZeRO-3 and with latent shards (parameters are gathered); full tensors
    on every rank that writes (see SAETrainer.state_tensors)."""
    cpu = lambda v: v.detach().to("cpu").clone().contiguous()  # noqa: E731
    out = {f"sae.{k}": cpu(v) for k, v in tr.state_tensors().items()}
    if _has_eval_mode(tr):  # schedule-free: its evaluation weights too (for export)
        with training_weights_kept([tr]), tr.stepper.weights_for_eval():
            out |= {f"eval.{k}": cpu(v) for k, v in tr.state_tensors().items()}
    out["tokens_since_fired"] = cpu(tr.tokens_since_fired)
    out["fire_counts"] = cpu(tr.fire_counts)
    return out


def _load_trainer(path: Path, name: str, tr, step_count: int) -> None:
    tensors = load_file(str(path / f"{name}.safetensors"))
    sae_state = {k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")}
    zero_saved = (path / f"{name}.{ZERO_OPTIM}").is_file()
    if _is_zero(tr):
        # The module weights and the fp32 master weights may differ (changes made under
        # GatheredParameters, like the decoder renorm, reach only the module): both are put back.
        with tr.stepper.gathered(modify=True), torch.no_grad():
            for key, value in tr.sae.state_dict(keep_vars=True).items():
                value.copy_(sae_state[key])
        source = ZeroPieces(path, name) if zero_saved else TorchPieces(path, name, tensors, step_count)
        tr.stepper.load_optimizer_partition(source)
        _apply_settings(tr.stepper, source.settings)
    else:
        tr.load_state_tensors(sae_state)  # latent shards: each takes its rows
        if zero_saved:
            source = ZeroPieces(path, name)
            tr.load_optimizer_state({"optimizer": _torch_optimizer_state(source, tr.stepper)})
            _apply_settings(tr.stepper, source.settings)
        else:
            tr.load_optimizer_state(torch.load(path / f"{name}.{DDP_OPTIM}", weights_only=True))
    tr.tokens_since_fired.copy_(tensors["tokens_since_fired"])
    tr.fire_counts.copy_(tensors["fire_counts"])
    tr.step_count = int(step_count)


# --------------------------------------------------------------------------- optimizer state


def _param_names(runner) -> list[str]:
    """The runner's parameter names in its optimizer's order (the order of torch state dicts)."""
    names = {id(p): n for n, p in runner.module.named_parameters()}
    return [names[id(p)] for group in runner.optimizer.param_groups for p in group["params"]]


def _optimizer_settings(runner) -> dict:
    """What every rank's optimizer shares, as JSON: param-group hyperparameters (lr included)
    and the scheduler's state."""
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
              for g in runner.optimizer.param_groups]
    return {"param_groups": groups, "scheduler": runner.scheduler.state_dict() if runner.scheduler else None}


def _apply_settings(runner, settings: dict) -> None:
    groups = runner.optimizer.param_groups
    if len(groups) != len(settings["param_groups"]):
        raise CheckpointError(f"the checkpoint's optimizer has {len(settings['param_groups'])} parameter groups, "
                              f"this one {len(groups)}")
    for group, saved in zip(groups, settings["param_groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    if runner.scheduler is not None and settings["scheduler"] is not None:
        runner.scheduler.load_state_dict(settings["scheduler"])


class ZeroPieces:
    """A ZeRO checkpoint's optimizer state of one SAE, read as ranges of each parameter's
    flattened full tensors whatever world size or stage wrote it: every rank wrote its own
    pieces (`<sae>.optim.rank_R.safetensors` + `.json`), and a reader takes just the slices
    it needs from each file."""

    def __init__(self, path: Path, name: str):
        self.settings = json.loads((path / f"{name}.{ZERO_OPTIM}").read_text())
        self.files, self.params = [], {}
        for rank in range(self.settings["world"]):
            base = f"{name}.optim.{_rank_name(rank)}"
            meta = json.loads((path / f"{base}.json").read_text())
            self.files.append(path / f"{base}.safetensors")
            for param, p in meta["params"].items():
                entry = self.params.setdefault(param, {**p, "pieces": []})
                entry["pieces"].append((rank, p["start"], p["numel"]))
            if rank == 0:
                self.counters = {k: meta[k] for k in ("global_steps", "skipped_steps")}

    def _param(self, name: str) -> dict:
        if name not in self.params:
            raise CheckpointError(f"the checkpoint has no optimizer state for parameter {name} "
                                  f"(it has {sorted(self.params)})")
        return self.params[name]

    def shape(self, name: str) -> list[int]:
        return self._param(name)["shape"]

    def step(self, name: str) -> float | None:
        return self._param(name)["step"]

    def keys(self, name: str) -> list[str]:
        return self._param(name)["keys"]

    def read(self, name: str, key: str, start: int, numel: int) -> torch.Tensor:
        out, filled = torch.empty(numel), 0
        for rank, first, count in self._param(name)["pieces"]:
            lo, hi = max(start, first), min(start + numel, first + count)
            if lo < hi:
                with safe_open(str(self.files[rank]), framework="pt") as f:
                    out[lo - start:hi - start] = f.get_slice(f"{name}.{key}")[lo - first:hi - first]
                filled += hi - lo
        if filled != numel:
            raise CheckpointError(f"{name}.{key}: the saved pieces cover {filled} of elements {start}..{start + numel}")
        return out


class TorchPieces:
    """A ddp checkpoint's optimizer state of one SAE, seen like ZeroPieces: its torch state
    dict (exp_avg, exp_avg_sq, step per parameter) with the module weights as master weights."""

    def __init__(self, path: Path, name: str, tensors: dict, step_count: int):
        saved = torch.load(path / f"{name}.{DDP_OPTIM}", weights_only=True)
        optimizer = saved["optimizer"]
        self.settings = {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                          for g in optimizer["param_groups"]], "scheduler": saved.get("scheduler")}
        self.counters = {"global_steps": step_count, "skipped_steps": 0}
        self.full = {}
        for i, param in enumerate(saved["param_names"]):
            state = optimizer["state"].get(i, {})
            self.full[param] = {"master": tensors[param], "step": float(state["step"]) if "step" in state else None,
                                **{k: v for k, v in state.items() if k != "step"}}

    def shape(self, name: str) -> list[int]:
        return list(self.full[name]["master"].shape)

    def step(self, name: str) -> float | None:
        return self.full[name]["step"]

    def keys(self, name: str) -> list[str]:
        return sorted(k for k in self.full[name] if k not in ("master", "step"))

    def read(self, name: str, key: str, start: int, numel: int) -> torch.Tensor:
        return self.full[name][key].reshape(-1)[start:start + numel].float()


def _torch_optimizer_state(source: ZeroPieces, runner) -> dict:
    """A torch optimizer state dict for `runner` (ddp) from a ZeRO checkpoint's pieces; its
    hyperparameters and schedule are set afterwards (_apply_settings)."""
    state = {}
    for i, name in enumerate(_param_names(runner)):
        step = source.step(name)
        if step is not None:
            shape, numel = source.shape(name), math.prod(source.shape(name))
            state[i] = {"step": torch.tensor(step, dtype=torch.float32),
                        **{k: source.read(name, k, 0, numel).view(shape) for k in source.keys(name)}}
    return {"state": state, "param_groups": runner.optimizer.state_dict()["param_groups"]}


def load_checkpoint(path: Path, trainers: dict) -> dict:
    """Weights, optimizer and counters into trainers (of any strategy); returns state.json."""
    _check_format(verify(path), "zero" if any(_is_zero(tr) for tr in trainers.values()) else "ddp")
    state = read_state(path)
    for name, tr in trainers.items():
        _load_trainer(path, name, tr, state["saes"][name])
    return state


# --------------------------------------------------------------------------- rng


def _rng_state() -> tuple[dict, dict]:
    """(json part, tensor part) of the python, numpy and torch generators."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = {"python": [version, list(internal), gauss], "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return meta, tensors


def _set_rng_state(meta: dict, tensors: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- compatibility


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
        if flat_a.get(key) != flat_b.get(key) and key != "train.resume":
            (blocking if key in MUST_MATCH else harmless).append(f"{key}: {flat_a.get(key)!r} -> {flat_b.get(key)!r}")
    return blocking, harmless


def _check_format(manifest: dict, strategy: str) -> None:
    fmt = manifest.get("format")
    if fmt == FORMAT or (fmt == 2 and manifest["strategy"] == strategy == "ddp"):  # ddp files are unchanged
        return
    where = f"checkpoint {manifest.get('name', '')} (format {fmt}, {manifest['strategy']})"
    if fmt == 2 and manifest["strategy"] != "ddp":
        why = ("its ZeRO optimizer state is a DeepSpeed checkpoint made of pickles, which this version never "
               "unpickles")
    elif fmt == 2:
        why = f"its optimizer state lacks the parameter names needed to convert it to {strategy}"
    else:
        why = f"this version reads format {FORMAT}"
    raise CheckpointError(f"{where} cannot resume: {why}. Resume it with the sparsemill version that wrote it"
                          f"{' or with dist.strategy=ddp' if manifest['strategy'] == 'ddp' else ''}, or start "
                          "fresh with --no-resume (`sparsemill export` still reads its weights).")


def compatibility(manifest: dict, world: int, strategy: str, placement: str) -> str:
    """How a checkpoint resumes under this layout: "exact" (same world size, strategy and
    placement) or "elastic" (anything else: the optimizer state is converted and re-sharded,
    so weights, optimizer moments, step, schedule and dead-latent counters are exact; the data
    streams continue exactly if only the strategy changed, otherwise from the furthest
    document/chunk any rank had reached with empty mixing buffers). Raises for checkpoints of
    another format and for layouts that cannot exist (ZeRO shards an SAE over the ranks that
    train it; layer placement trains each SAE whole on one rank)."""
    old = (manifest["world_size"], manifest["strategy"], manifest["sae_placement"])
    _check_format(manifest, strategy)
    for s, p in (old[1:], (strategy, placement)):
        if s.startswith("zero") and p == "layer":
            raise CheckpointError(f"checkpoint written by {old[1]}/{old[2]} on {old[0]} rank(s) cannot resume as "
                                  f"{strategy}/{placement} on {world} rank(s): ZeRO does not combine with "
                                  "dist.sae_placement=layer")
    return "exact" if old == (world, strategy, placement) else "elastic"


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves and restores one run's state. Every rank holds one; `save` and `resume` are
    collective. `trainers` are this rank's; `each_rank_writes`: layer-distributed SAEs (each
    rank writes the SAEs it owns), otherwise rank 0 writes the replicated state."""

    def __init__(self, root: Path, cfg, engine, trainers: dict, buffer, source, each_rank_writes: bool):
        self.root, self.cfg, self.engine = Path(root), cfg, engine
        self.trainers, self.buffer, self.source = trainers, buffer, source
        self.each_rank_writes = each_rank_writes
        self.writes = engine.is_main or each_rank_writes
        self.last_saved_step = -1
        self.last_save_time = time.monotonic()

    # -- collective helpers ------------------------------------------------------------
    def _gather(self, obj) -> list:
        if self.engine.world == 1:
            return [obj]
        out = [None] * self.engine.world
        dist.all_gather_object(out, obj)
        return out

    def _broadcast(self, obj):
        if self.engine.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def due(self, step: int) -> bool:
        """Periodic save at this step? Every train.checkpoint_every steps and/or when
        train.checkpoint_minutes have passed since the last save (rank 0's clock decides)."""
        every, minutes = self.cfg.train.checkpoint_every, self.cfg.train.checkpoint_minutes
        if every and step % every == 0:
            return True
        if minutes <= 0:
            return False
        late = self.engine.is_main and time.monotonic() - self.last_save_time >= minutes * 60
        flag = self.engine.all_reduce_(torch.tensor([1.0 if late else 0.0], device=self.engine.device))
        return bool(flag.item())

    # -- saving ------------------------------------------------------------------------
    def save(self, step: int, tokens: int, extra: dict | None = None) -> Path:
        """Collective. Publishes RUN_DIR/checkpoints/step_N or raises CheckpointError (then
        nothing was published and the previous checkpoint is untouched)."""
        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".tmp_{name}"
        if step == self.last_saved_step:
            return final
        failure: list[str] = []
        if self.engine.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as err:
                failure.append(str(err))
        self._agree(failure, name, tmp)

        steps = {n: tr.step_count for n, tr in self.trainers.items()}
        steps = {k: v for part in self._gather(steps) for k, v in part.items()} if self.each_rank_writes else steps

        def attempt(fn) -> None:
            if not failure:
                try:
                    fn()
                except OSError as err:
                    failure.append(f"{err}")

        for n, tr in self.trainers.items():
            if _is_zero(tr):  # every rank writes its own pieces of the optimizer state
                part, meta = tr.stepper.optimizer_partition()
                base = f"{n}.optim.{_rank_name(self.engine.rank)}"
                attempt(lambda: _write_file(tmp / f"{base}.safetensors", save(part)))
                attempt(lambda: _write_json(tmp / f"{base}.json", meta))
            tensors = _trainer_tensors(tr)  # collective under ZeRO-3 and with latent shards
            torch_optim = None if _is_zero(tr) else tr.optimizer_state()  # collective with latent shards
            if self.writes:
                attempt(lambda: _write_file(tmp / f"{n}.safetensors", save(tensors)))
                if _is_zero(tr):
                    settings = {"world": self.engine.world, **_optimizer_settings(tr.stepper)}
                    attempt(lambda: _write_json(tmp / f"{n}.{ZERO_OPTIM}", settings))
                else:
                    optim = {**torch_optim, "param_names": _param_names(tr.stepper)}
                    attempt(lambda: _write_file(tmp / f"{n}.{DDP_OPTIM}", _torch_bytes(optim)))
        attempt(lambda: self._write_rank_files(tmp))
        self._agree(failure, name, tmp)

        if self.engine.is_main:
            attempt(lambda: self._publish(tmp, final, step, tokens, steps, extra or {}))
        self._agree(failure, name, tmp)
        self.last_saved_step, self.last_save_time = step, time.monotonic()
        return final

    def _write_rank_files(self, tmp: Path) -> None:
        rng_meta, tensors = _rng_state()
        tensors |= {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}
        sum_steps = {}
        for n, tr in self.trainers.items():
            tensors |= {f"sums.{n}.{k}": torch.as_tensor(v).detach().to("cpu").reshape(()).clone()
                        for k, v in tr.sums.items()}
            sum_steps[n] = tr.sum_steps
        meta = {"rank": self.engine.rank, "world": self.engine.world, "source": self.source.state_dict(),
                "rng": rng_meta, "sum_steps": sum_steps}
        base = _rank_name(self.engine.rank)
        _write_file(tmp / f"{base}.safetensors", save(tensors))
        _write_json(tmp / f"{base}.json", meta)

    def _publish(self, tmp: Path, final: Path, step: int, tokens: int, steps: dict, extra: dict) -> None:
        cfg, engine = self.cfg, self.engine
        state = {"step": step, "tokens": tokens, "world_size": engine.world, "saes": steps, **extra}
        _write_json(tmp / STATE, state)
        _write_file(tmp / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = _hash_file(f)
        from framework.routing import assign_owners  # noqa: PLC0415

        names = [s.name for s in cfg.saes]
        owners = (assign_owners(names, engine.world) if cfg.dist.sae_placement == "layer" and engine.world > 1
                  else {n: "all" for n in names})
        manifest = {"format": FORMAT, "name": final.name, "step": step, "tokens": tokens,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "world_size": engine.world, "strategy": cfg.dist.strategy,
                    "sae_placement": cfg.dist.sae_placement if engine.world > 1 else "replicated",
                    "owners": owners, "files": files}
        _write_json(tmp / MANIFEST, manifest)
        for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        _fsync_dir(tmp)
        trash = self.root / f".trash_{final.name}"
        if final.exists():  # re-saving a step (after a fallback): the old folder goes only after the rename
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        pointer = self.root / (LATEST + ".tmp")
        _write_file(pointer, final.name.encode())
        os.replace(pointer, self.root / LATEST)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        """Keep the newest train.keep_checkpoints up to `newest`; later ones are leftovers of a
        lineage abandoned by a fallback (they failed verification), earlier ones are old."""
        done = list_checkpoints(self.root)
        kept = [p for p in done if step_of(p) <= newest][-max(1, self.cfg.train.keep_checkpoints):]
        for p in done:
            if p not in kept:
                shutil.rmtree(p, ignore_errors=True)
        for p in [*self.root.glob(".tmp_step_*"), *self.root.glob(".trash_step_*")]:  # interrupted saves
            shutil.rmtree(p, ignore_errors=True)

    def _agree(self, failure: list[str], name: str, tmp: Path) -> None:
        """Every rank learns whether any failed; on failure the partial folder goes and all raise."""
        flag = torch.tensor([1.0 if failure else 0.0], device=self.engine.device)
        if not self.engine.all_reduce_(flag).item():
            return
        reasons = [f"rank {r}: {msg}" for r, part in enumerate(self._gather(failure)) for msg in part]
        if self.engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_name(self.root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {name} ({'; '.join(reasons)}); nothing was published and "
                              f"{kept}. Fix the cause (e.g. free disk space) and rerun the same command to resume.")

    # -- resuming ----------------------------------------------------------------------
    def resume(self, allowed: bool = True) -> dict | None:
        """Collective. Restore the newest valid checkpoint (falling back past invalid ones) and
        return its state.json, or return None for a fresh start (old checkpoints are then moved
        aside, so they never mix with the new run's)."""
        choice = self._choose() if self.engine.is_main and allowed else None
        choice = self._broadcast(choice)
        if isinstance(choice, str):
            raise CheckpointError(choice)
        if choice is None:
            if self.engine.is_main:
                self._set_aside()
            self.engine.barrier()
            return None
        path = self.root / choice["name"]
        state = read_state(path)
        self._restore(path, state, choice["same_ranks"])
        if self.engine.is_main:
            data = ("the data stream continues where it stopped" if choice["same_ranks"] else
                    "the data stream continues from the furthest position any rank had reached, mixing buffers "
                    "start empty")
            where = (data if choice["mode"] == "exact" else f"elastic resume from {choice['layout']}: weights, "
                     f"optimizer and counters restored (converted and re-sharded); {data}")
            log.warning("resuming from %s (step %d, %d tokens); %s", path, state["step"], state["tokens"], where)
        self.last_saved_step = state["step"]
        return state

    def _choose(self):
        """Rank 0: {"name", "mode", "layout", "same_ranks"}, None (nothing to resume) or an error message."""
        found = newest_valid(self.root, lambda err: log.warning("checkpoint %s; falling back to an older one", err))
        if found is None:
            return None
        path, manifest = found
        cfg = self.cfg
        placement = cfg.dist.sae_placement if self.engine.world > 1 else "replicated"
        try:
            mode = compatibility(manifest, self.engine.world, cfg.dist.strategy, placement)
        except CheckpointError as err:
            return f"{path}: {err}"
        saved = yaml.safe_load((path / CONFIG).read_text())
        blocking, harmless = config_differences(saved, cfg.to_dict())
        if blocking:
            return (f"{path} was written with a different configuration ({'; '.join(blocking)}); its state cannot "
                    "continue under these settings. Restore them, or start fresh with --no-resume.")
        if harmless:
            log.warning("config differs from the checkpoint's (%s); continuing with the new values", "; ".join(harmless))
        layout = f"{manifest['strategy']}/{manifest['sae_placement']} on {manifest['world_size']} rank(s)"
        same_ranks = (manifest["world_size"], manifest["sae_placement"]) == (self.engine.world, placement)
        return {"name": path.name, "mode": mode, "layout": layout, "same_ranks": same_ranks}

    def _set_aside(self) -> None:
        old = [p for p in self.root.glob("step_*") if p.is_dir()] if self.root.is_dir() else []
        if not old:
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = self.root.parent / f"checkpoints.previous-{stamp}"
        os.replace(self.root, aside)
        log.warning("starting fresh: the earlier checkpoints were moved to %s", aside)

    def _restore(self, path: Path, state: dict, same_ranks: bool) -> None:
        """Trainers from any layout; the data stream, mixing buffer and metric sums of each rank
        exactly if the ranks are the same (world size and placement: they do not depend on the
        strategy), otherwise merged (see compatibility)."""
        for name, tr in self.trainers.items():
            _load_trainer(path, name, tr, state["saes"][name])
        rank = self.engine.rank
        if same_ranks:
            meta = json.loads((path / f"{_rank_name(rank)}.json").read_text())
            tensors = load_file(str(path / f"{_rank_name(rank)}.safetensors"))
            self.source.load_state_dict(meta["source"])
            self.buffer.load_state_dict({k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")})
            for name, tr in self.trainers.items():
                prefix = f"sums.{name}."
                tr.sums = {k[len(prefix):]: v.to(tr.tokens_since_fired.device) for k, v in tensors.items()
                           if k.startswith(prefix)}
                tr.sum_steps = meta["sum_steps"][name]
        else:
            from framework.activations import merge_positions  # noqa: PLC0415

            old = [json.loads((path / f"{_rank_name(r)}.json").read_text()) for r in range(state["world_size"])]
            self.source.load_position(merge_positions([m["source"]["position"] for m in old]))
            if rank == 0:  # the skip counters are summed over ranks at the end: keep their total once
                self.source.nonfinite_tokens = sum(m["source"]["nonfinite_tokens"] for m in old)
                self.source.outlier_tokens = sum(m["source"]["outlier_tokens"] for m in old)
            meta = old[rank % len(old)]
            tensors = load_file(str(path / f"{_rank_name(meta['rank'])}.safetensors"))
        _set_rng_state(meta["rng"], tensors)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def latest_name(root: Path) -> str | None:
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


# --------------------------------------------------------------------------- export and inspect


def export_metadata(cfg, sae_cfg, tokens: int) -> dict:
    from framework import hooks  # noqa: PLC0415

    return {
        "model_name": cfg.model.name if cfg.data.source == "text" else "",
        "hook_name": hooks.parse_site(sae_cfg.site).tl_name if sae_cfg.site else "",
        "hook_name_out": hooks.parse_site(sae_cfg.output_site).tl_name if sae_cfg.output_site else None,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": ",".join(cfg.data.paths) or cfg.data.activations_dir,
        "training_tokens": tokens,
    }


def _resolve(run_dir: Path, name: str | None) -> tuple[Path, dict]:
    root = Path(run_dir) / "checkpoints"
    if name:
        path = root / name if (root / name).is_dir() else Path(name)
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint '{name}' in {root} (have: {[p.name for p in list_checkpoints(root)]})")
        return path, verify(path)
    found = newest_valid(root, lambda err: log.warning("checkpoint %s; using an older one", err))
    if found is None:
        raise CheckpointError(f"no valid checkpoint in {root}")
    return found


def export_checkpoint(run_dir: Path, name: str | None = None, out: Path | None = None) -> list[Path]:
    """SAELens folders (one per SAE) from a checkpoint of any strategy, placement or world
    size: its `<sae>.safetensors` hold gathered full tensors."""
    from framework.config import RunConfig, _build  # noqa: PLC0415
    from framework.export import export_sae  # noqa: PLC0415
    from framework.sae import build_sae  # noqa: PLC0415

    path, manifest = _resolve(run_dir, name)
    cfg = _build(RunConfig, yaml.safe_load((path / CONFIG).read_text()))  # no validation: data may have moved
    out = Path(out) if out is not None else Path(run_dir) / "export" / path.name
    folders = []
    for s in cfg.saes:
        tensors = load_file(str(path / f"{s.name}.safetensors"))
        prefix = "eval." if any(k.startswith("eval.") for k in tensors) else "sae."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        n_latents, d_in = weights["encoder_weight"].shape
        transcoder = bool(s.output_site) and s.output_site != s.site
        sae = build_sae(s.kind, d_in, n_latents, s.k, d_out=weights["decoder_weight"].shape[1] if transcoder else None,
                        options=s.options, skip_connection=s.skip_connection)
        sae.load_state_dict(weights)
        sae.eval()
        folders.append(export_sae(sae, out / s.name, s.kind, export_metadata(cfg, s, manifest["tokens"])))
    return folders


def inspect_run(run_dir: Path) -> list[dict]:
    """One row per checkpoint folder: name, step, tokens, validity, layout, eval metrics."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    latest = latest_name(root)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    rows = []
    for path in list_checkpoints(root):
        row = {"name": path.name, "step": step_of(path), "latest": path.name == latest}
        try:
            manifest = verify(path)
            row |= {"valid": True, "tokens": manifest["tokens"], "world_size": manifest["world_size"],
                    "strategy": manifest["strategy"], "sae_placement": manifest["sae_placement"],
                    "created": manifest["created"], "bytes": sum(f["size"] for f in manifest["files"].values())}
            state = read_state(path)
            if state.get("eval"):
                row["eval"] = state["eval"]
            if summary and summary.get("steps") == row["step"]:
                row["eval"] = {"step": row["step"], "metrics": summary["saes"], "final": True}
        except InvalidCheckpoint as err:
            row |= {"valid": False, "problem": str(err)}
        rows.append(row)
    for p in sorted(root.glob(".tmp_step_*")) if root.is_dir() else []:
        rows.append({"name": p.name, "step": step_of(p), "valid": False, "latest": False,
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

