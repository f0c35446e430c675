"""The state manager: atomic, verified checkpoints of everything a run needs to continue
exactly, and their export and inspection.

Layout of RUN_DIR/checkpoints/:
    step_00001234/
      manifest.json           every other file with size and sha256; world size, strategy, placement
      state.json              step, tokens, per-SAE step counts, logger position, last eval
      config.yaml             the resolved run config
      <sae>.safetensors       gathered full weights `sae.*` (normalisation constants included), the
                              dead-latent counters and fire counts (+ `eval.*`: schedule-free eval weights)
      <sae>.optim.json        param-group hyperparameters (lr...), scheduler state, number of pieces
      <sae>.optim.rank_00000.safetensors / .json
                              pieces of each parameter's flattened optimizer state (Adam moments; ZeRO's
                              fp32 master weights), with per parameter its full shape, step count and
                              which elements the piece holds: zero1/2/3 write one piece per rank (its
                              partition), a torch optimizer one piece of whole tensors
                              (framework/optimizer_state.py)
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

Nothing is ever unpickled: tensors are safetensors, the rest JSON/YAML. ZeRO state
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
  format 2, or format 3 with ddp (older        refused without being opened: they hold pickles
  versions)                                    (DeepSpeed's checkpoints, torch.save optimizer files)
`sparsemill export` works from any checkpoint: its `<sae>.safetensors` hold full tensors.

Test hook: SPARSEMILL_SAVE_DELAY=<seconds> sleeps after each file this module writes, so a
kill can be made to land in the middle of a save.
"""

from __future__ import annotations

import datetime
import json
import logging
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
from safetensors.torch import load_file, save

from framework import durable, optimizer_state
from framework.errors import CheckpointError

log = logging.getLogger("sparsemill")

LATEST, MANIFEST, STATE, CONFIG = "latest", "manifest.json", "state.json", "config.yaml"
# 4: every optimizer in safetensors + JSON. 3: a ddp optimizer in a torch.save archive (`<sae>.optim.pt`);
# 2: ZeRO optimizer state in DeepSpeed's own (pickled) checkpoint folders.
FORMAT = 4
SAVE_DELAY_ENV = durable.SAVE_DELAY_ENV

# Config keys whose change makes the saved state meaningless (data order, shapes, optimizer).
MUST_MATCH = ["model.name", "data.source", "data.paths", "data.text_field", "data.tokens_field", "data.split",
              "data.context_size", "data.prepend_bos", "data.separator", "data.exclude_special_tokens",
              "data.llm_batch_size", "data.shuffle_files", "data.activations_dir", "train.batch_size",
              "train.buffer_tokens", "train.seed", "train.optimizer", "dist.latent_shards"]
SAE_MUST_MATCH = ["name", "site", "output_site", "kind", "n_latents", "options", "skip_connection"]
# an SAE key a checkpoint's config lacks (added since it was written) compares as this default
SAE_KEY_DEFAULTS = {"skip_connection": False}


class InvalidCheckpoint(CheckpointError):
    """A checkpoint folder failed its manifest check."""


# --------------------------------------------------------------------------- files


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
        if durable.hash_file(f)["sha256"] != expected["sha256"]:
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
    saved = optimizer_state.SavedOptimizer(path, name, tensors)  # module weights keyed `sae.<name>`, as the optimizer sees them
    if _is_zero(tr):
        # The module weights and the fp32 master weights may differ (changes made under
        # GatheredParameters, like the decoder renorm, reach only the module): both are put back.
        with tr.stepper.gathered(modify=True), torch.no_grad():
            for key, value in tr.sae.state_dict(keep_vars=True).items():
                value.copy_(sae_state[key])
        tr.stepper.load_optimizer_partition(saved)
    else:
        tr.load_state_tensors(sae_state)  # latent shards: each takes its rows
        tr.load_optimizer_state({"optimizer": saved.torch_state(tr.stepper)})
    optimizer_state.apply_settings(tr.stepper, saved.settings)
    tr.tokens_since_fired.copy_(tensors["tokens_since_fired"])
    tr.fire_counts.copy_(tensors["fire_counts"])
    tr.step_count = int(step_count)


# --------------------------------------------------------------------------- optimizer state


def load_checkpoint(path: Path, trainers: dict) -> dict:
    """Weights, optimizer and counters into trainers (of any strategy); returns state.json."""
    _check_format(verify(path))
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


def _check_format(manifest: dict) -> None:
    """Format 4, or a format-3 ZeRO checkpoint (the same layout); anything with a pickle in it
    is refused without being opened."""
    fmt = manifest.get("format")
    if fmt == FORMAT or (fmt == 3 and manifest["strategy"] != "ddp"):
        return
    where = f"checkpoint {manifest.get('name', '')} (format {fmt}, {manifest['strategy']})"
    if fmt in (2, 3):
        what = "DeepSpeed checkpoint" if manifest["strategy"] != "ddp" else "optimizer file (<sae>.optim.pt)"
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
    _check_format(manifest)
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

        def attempt(fn) -> None:
            """Any failure (a full disk, or a bug) is recorded, never raised here: every rank
            must reach the agreement step, or the others would wait there forever."""
            if not failure:
                try:
                    fn()
                except Exception as err:  # noqa: BLE001
                    failure.append(f"{err}" if isinstance(err, OSError) else f"{type(err).__name__}: {err}")

        steps = {n: tr.step_count for n, tr in self.trainers.items()}
        steps = {k: v for part in self._gather(steps) for k, v in part.items()} if self.each_rank_writes else steps

        for n, tr in self.trainers.items():
            if _is_zero(tr):  # every rank writes its own pieces of the optimizer state
                part, meta = tr.stepper.optimizer_partition()
                base = optimizer_state.piece_base(n, self.engine.rank)
                attempt(lambda: durable.write_file(tmp / f"{base}.safetensors", save(part)))
                attempt(lambda: durable.write_json(tmp / f"{base}.json", meta))
            tensors = _trainer_tensors(tr)  # collective under ZeRO-3 and with latent shards
            torch_optim = None if _is_zero(tr) else tr.optimizer_state()  # collective with latent shards
            if self.writes:
                attempt(lambda: durable.write_file(tmp / f"{n}.safetensors", save(tensors)))
                pieces = self.engine.world if _is_zero(tr) else 1
                attempt(lambda: durable.write_json(tmp / f"{n}.{optimizer_state.SETTINGS_SUFFIX}",
                                            optimizer_state.settings(tr.stepper, pieces)))
                if torch_optim is not None:  # a torch optimizer: one piece holding each tensor whole
                    part, meta = optimizer_state.torch_pieces(torch_optim["optimizer"],
                                                              optimizer_state.param_names(tr.stepper), tr.step_count)
                    base = optimizer_state.piece_base(n, 0)
                    attempt(lambda: durable.write_file(tmp / f"{base}.safetensors", save(part)))
                    attempt(lambda: durable.write_json(tmp / f"{base}.json", meta))
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
        durable.write_file(tmp / f"{base}.safetensors", save(tensors))
        durable.write_json(tmp / f"{base}.json", meta)

    def _publish(self, tmp: Path, final: Path, step: int, tokens: int, steps: dict, extra: dict) -> None:
        cfg, engine = self.cfg, self.engine
        state = {"step": step, "tokens": tokens, "world_size": engine.world, "saes": steps, **extra}
        durable.write_json(tmp / STATE, state)
        durable.write_file(tmp / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = durable.hash_file(f)
        from framework.routing import assign_owners  # noqa: PLC0415

        names = [s.name for s in cfg.saes]
        owners = (assign_owners(names, engine.world) if cfg.dist.sae_placement == "layer" and engine.world > 1
                  else {n: "all" for n in names})
        manifest = {"format": FORMAT, "name": final.name, "step": step, "tokens": tokens,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "world_size": engine.world, "strategy": cfg.dist.strategy,
                    "sae_placement": cfg.dist.sae_placement if engine.world > 1 else "replicated",
                    "owners": owners, "files": files}
        durable.write_json(tmp / MANIFEST, manifest)
        durable.publish_folder(tmp, final)  # re-saving a step (after a fallback) replaces it only now
        _write_pointer(self.root, final.name)
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
        self._repair_latest(found[0] if found else None)
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

    def _repair_latest(self, chosen: Path | None) -> None:
        """`latest` must name the checkpoint a resume uses; a stale or dangling pointer (its
        folder deleted, or invalid) is said and rewritten."""
        named = latest_name(self.root)
        if named is None or (chosen is not None and named == chosen.name):
            return
        target = chosen.name if chosen is not None else None
        log.warning("checkpoints/%s names '%s', which %s; %s", LATEST, named,
                    "does not exist" if not (self.root / named).is_dir() else "is not the newest valid checkpoint",
                    f"repointing it to {target}" if target else "removing it (no valid checkpoint is left)")
        if target is None:
            (self.root / LATEST).unlink()
            return
        _write_pointer(self.root, target)

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
                for m in old:
                    for reason, count in m["source"].get("skipped", {}).items():
                        self.source.skipped["train"][reason] += count
            meta = old[rank % len(old)]
            tensors = load_file(str(path / f"{_rank_name(meta['rank'])}.safetensors"))
        _set_rng_state(meta["rng"], tensors)


def _write_pointer(root: Path, name: str) -> None:
    """Atomically point `latest` at checkpoint `name`."""
    pointer = root / (LATEST + ".tmp")
    durable.write_file(pointer, name.encode())
    os.replace(pointer, root / LATEST)
    durable.fsync_dir(root)


def latest_name(root: Path) -> str | None:
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


# --------------------------------------------------------------------------- export and inspect


def export_metadata(cfg, sae_cfg, tokens: int, sites: tuple[str, str] | None = None) -> dict:
    """SAELens metadata; `sites` are the (input, output) keys the SAE trained on (an activation
    file's single tensor when saes.N.site was left empty)."""
    from framework import hooks  # noqa: PLC0415

    site, output_site = sites or (sae_cfg.site, sae_cfg.output_site or sae_cfg.site)
    return {
        "model_name": cfg.model.name if cfg.data.source == "text" else "",
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
            raise CheckpointError(f"no checkpoint '{name}' in {root} (have: {[p.name for p in list_checkpoints(root)]})")
        return path, verify(path)
    found = newest_valid(root, lambda err: log.warning("checkpoint %s; using an older one", err))
    if found is None:
        raise CheckpointError(f"no valid checkpoint in {root}")
    return found


def export_checkpoint(run_dir: Path, name: str | None = None, out: Path | None = None) -> list[Path]:
    """SAELens folders (one per SAE) from a checkpoint of any strategy, placement or world
    size: its `<sae>.safetensors` hold gathered full tensors."""
    from framework.schema import RunConfig, build_dataclass  # noqa: PLC0415
    from framework.export import export_sae  # noqa: PLC0415
    from framework.kinds import build_sae  # noqa: PLC0415

    path, manifest = _resolve(run_dir, name)
    cfg = build_dataclass(RunConfig, yaml.safe_load((path / CONFIG).read_text()))  # no validation: data may have moved
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
    run_dir = _existing_run_dir(run_dir)
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

