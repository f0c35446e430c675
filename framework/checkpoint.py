"""The checkpoint manager: atomic, verified checkpoints of the Stateful components it is handed
(framework/stateful.py), and the collective protocol that saves and resumes them. What each
component saves, and how it restores itself under another layout, is the component's business.

Layout of RUN_DIR/checkpoints/:
    step_00001234/
      manifest.json           every other file with size and sha256; format, world size, strategy,
                              placement, step, tokens
      config.yaml             the resolved run config
      <component>.safetensors / .json
                              a component's shared part (written once, by the rank that returned
                              it): `state` (step, tokens, last eval), each SAE (`<sae>`: weights
                              `sae.*`, counters, optimizer settings and, for torch optimizers, its
                              state `optim.*`)
      rank_00000.safetensors / .json
                              every component's local part on that rank (tensors `<component>/<key>`,
                              JSON {component: meta}): data position, mixing buffer, RNG, metric sums,
                              a ZeRO rank's optimizer partition
    latest                    name of the newest published checkpoint

Saving is collective (every rank calls it at the same step). Everything goes into
`.tmp_step_N/` (framework/durable.py: each file fsynced); rank 0 then hashes the files into the
manifest, fsyncs the folders, renames the folder to `step_N` and only then rewrites `latest`.
Old checkpoints are pruned after that, so the last good checkpoint is never removed before a
new one is complete. A failure on any rank (a full disk, or any exception) removes the
temporary folder on all and every rank raises CheckpointError (none is left waiting).

Resuming picks the newest checkpoint whose manifest checks out (every file present, of the
right size and sha256) and falls back to older ones, saying why; framework/compatibility.py
decides whether it may continue under this run. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from safetensors.torch import save

from framework import durable
from framework.compatibility import FORMAT, check_format, compatibility, config_differences
from framework.errors import CheckpointError
from framework.stateful import Loaded, Saved, State, Stateful

log = logging.getLogger("sparsemill")

LATEST, MANIFEST, CONFIG = "latest", "manifest.json", "config.yaml"
SAVE_DELAY_ENV = durable.SAVE_DELAY_ENV


class InvalidCheckpoint(CheckpointError):
    """A checkpoint folder failed its manifest check."""


# --------------------------------------------------------------------------- folders and files


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


def latest_name(root: Path) -> str | None:
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def _warn_if_threads_differ(saved: int | None) -> None:
    """Bitwise continuation needs the saved run's intra-op thread count: CPU reductions and
    GEMMs split their sums by thread, so another count changes the last bits of every step."""
    now = torch.get_num_threads()
    if saved is not None and saved != now:
        log.warning("this checkpoint was written with %d intra-op threads and this process has %d: training "
                    "continues correctly but not bit for bit as the uninterrupted run would have (set "
                    "OMP_NUM_THREADS=%d to match)", saved, now, saved)


def _write_pointer(root: Path, name: str) -> None:
    """Atomically point `latest` at checkpoint `name`."""
    pointer = root / (LATEST + ".tmp")
    durable.write_file(pointer, name.encode())
    os.replace(pointer, root / LATEST)
    durable.fsync_dir(root)


def _rank_name(rank: int) -> str:
    return f"rank_{rank:05d}"


class LazyTensors:
    """The tensors of a safetensors file (those under `prefix`, prefix stripped), each read
    when asked for; `slice` reads a range of a flat tensor without loading it whole."""

    def __init__(self, path: Path, prefix: str = ""):
        self.path, self.prefix = path, prefix
        with safe_open(str(path), framework="pt") as f:
            self._keys = [k[len(prefix):] for k in f.keys() if k.startswith(prefix)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(f"{self.path.name}: no tensor '{self.prefix}{key}'")
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(self.prefix + key)

    def slice(self, key: str, lo: int, hi: int) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(self.prefix + key)[lo:hi]


def _read_part(folder: Path, base: str, prefix: str = "", meta_key: str | None = None) -> Loaded | None:
    """A saved part from `<base>.safetensors` / `<base>.json` (the tensors under `prefix`, the
    JSON under `meta_key`), or None if they hold nothing of it."""
    tensors_file, meta_file = folder / f"{base}.safetensors", folder / f"{base}.json"
    tensors = LazyTensors(tensors_file, prefix) if tensors_file.is_file() else {}
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    if meta is not None and meta_key is not None:
        meta = meta.get(meta_key)
    if not list(tensors.keys()) and meta is None:
        return None
    return Loaded(tensors, meta or {})


def read_saved(path: Path, component: str, rank: int = 0, same_ranks: bool = True) -> Saved:
    """What checkpoint `path` holds of one component (for resuming, export and inspection)."""
    world = json.loads((path / MANIFEST).read_text())["world_size"]
    local = [_read_part(path, _rank_name(r), f"{component}/", component) for r in range(world)]
    return Saved(_read_part(path, component), local, rank, same_ranks)


def restore(path: Path, components: dict[str, Stateful], rank: int = 0, same_ranks: bool = True) -> None:
    """Load components (name -> Stateful) from checkpoint `path`; it must verify."""
    check_format(verify(path))
    for name, stateful in components.items():
        stateful.load_state_dict(read_saved(path, name, rank, same_ranks))


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves and restores the run's components (name -> Stateful). Every rank holds one, with
    this rank's components; `save` and `resume` are collective. `layout`: world size, strategy
    and placement of this run (recorded in the manifest, checked on resume)."""

    def __init__(self, root: Path, cfg, engine, components: dict[str, Stateful], placement: str):
        self.root, self.cfg, self.engine = Path(root), cfg, engine
        self.components = components
        self.placement = placement if engine.world > 1 else "replicated"
        self.last_saved_step = -1
        self.last_save_time = time.monotonic()

    # -- collective helpers ------------------------------------------------------------
    def _gather(self, obj) -> list:
        if self.engine.world == 1:
            return [obj]
        out = [None] * self.engine.world
        dist.all_gather_object(out, obj)
        return out

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
    def save(self, step: int, tokens: int) -> Path:
        """Collective. Publishes RUN_DIR/checkpoints/step_N or raises CheckpointError (then
        nothing was published and the previous checkpoint is untouched)."""
        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".tmp_{name}"
        if step == self.last_saved_step:
            return final
        failure: list[str] = []

        def attempt(fn) -> None:
            """Any failure (a full disk, or a bug) is recorded, never raised here: every rank
            must reach the agreement step, or the others would wait there forever."""
            if not failure:
                try:
                    fn()
                except Exception as err:  # noqa: BLE001
                    failure.append(f"{err}" if isinstance(err, OSError) else f"{type(err).__name__}: {err}")

        if self.engine.is_main:
            attempt(lambda: (self.root.mkdir(parents=True, exist_ok=True), shutil.rmtree(tmp, ignore_errors=True),
                             tmp.mkdir()))
        self._agree(failure, name, tmp)
        local = State()
        for component, stateful in self.components.items():  # the same order on every rank: some are collective
            state = stateful.state_dict()
            if state.shared is not None:
                attempt(lambda: self._write_part(tmp, component, state.shared))
            if state.local is not None:
                local.tensors |= {f"{component}/{k}": v for k, v in state.local.tensors.items()}
                local.meta[component] = state.local.meta
        attempt(lambda: self._write_part(tmp, _rank_name(self.engine.rank), local))
        self._agree(failure, name, tmp)
        if self.engine.is_main:
            attempt(lambda: self._publish(tmp, final, step, tokens))
        self._agree(failure, name, tmp)
        self.last_saved_step, self.last_save_time = step, time.monotonic()
        return final

    @staticmethod
    def _write_part(folder: Path, base: str, part: State) -> None:
        if part.tensors:
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in part.tensors.items()}
            durable.write_file(folder / f"{base}.safetensors", save(cpu))
        if part.meta:
            durable.write_json(folder / f"{base}.json", part.meta)

    def _publish(self, tmp: Path, final: Path, step: int, tokens: int) -> None:
        durable.write_file(tmp / CONFIG, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False).encode())
        files = {f.relative_to(tmp).as_posix(): durable.hash_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = {"format": FORMAT, "name": final.name, "step": step, "tokens": tokens,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "world_size": self.engine.world, "strategy": self.cfg.dist.strategy,
                    "sae_placement": self.placement, "intra_op_threads": torch.get_num_threads(), "files": files}
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
    def resume(self, allowed: bool = True) -> bool:
        """Collective. Restore every component from the newest valid checkpoint (falling back
        past invalid ones) and return True, or return False for a fresh start (old checkpoints
        are then moved aside, so they never mix with the new run's)."""
        choice = self._choose() if self.engine.is_main and allowed else None
        choice = self.engine.broadcast_object(choice)
        if isinstance(choice, str):
            raise CheckpointError(choice)
        if choice is None:
            if self.engine.is_main:
                self._set_aside()
            self.engine.barrier()
            return False
        path = self.root / choice["name"]
        for component, stateful in self.components.items():  # verified by rank 0 in _choose
            stateful.load_state_dict(read_saved(path, component, self.engine.rank, choice["same_ranks"]))
        if self.engine.is_main:
            data = ("the data stream continues where it stopped" if choice["same_ranks"] else
                    "the data stream continues from the furthest position any rank had reached, mixing buffers "
                    "start empty")
            where = (data if choice["mode"] == "exact" else f"elastic resume from {choice['layout']}: weights, "
                     f"optimizer and counters restored (converted and re-sharded); {data}")
            manifest = json.loads((path / MANIFEST).read_text())
            log.warning("resuming from %s (step %d, %d tokens); %s", path, manifest["step"], manifest["tokens"], where)
            if self.engine.device.type == "cpu":
                _warn_if_threads_differ(manifest.get("intra_op_threads"))
        self.last_saved_step = choice["step"]
        return True

    def _choose(self):
        """Rank 0: {"name", "step", "mode", "layout", "same_ranks"}, None (nothing to resume) or
        an error message."""
        found = newest_valid(self.root, lambda err: log.warning("checkpoint %s; falling back to an older one", err))
        self._repair_latest(found[0] if found else None)
        if found is None:
            return None
        path, manifest = found
        try:
            mode = compatibility(manifest, self.engine.world, self.cfg.dist.strategy, self.placement)
        except CheckpointError as err:
            return f"{path}: {err}"
        saved = yaml.safe_load((path / CONFIG).read_text())
        blocking, harmless = config_differences(saved, self.cfg.to_dict())
        if blocking:
            return (f"{path} was written with a different configuration ({'; '.join(blocking)}); its state cannot "
                    "continue under these settings. Restore them, or start fresh with --no-resume.")
        if harmless:
            log.warning("config differs from the checkpoint's (%s); continuing with the new values", "; ".join(harmless))
        layout = f"{manifest['strategy']}/{manifest['sae_placement']} on {manifest['world_size']} rank(s)"
        same_ranks = (manifest["world_size"], manifest["sae_placement"]) == (self.engine.world, self.placement)
        return {"name": path.name, "step": manifest["step"], "mode": mode, "layout": layout, "same_ranks": same_ranks}

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
