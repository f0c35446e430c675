"""Activation sources: one interface, fed either by a frozen LLM or by cached files.

A source yields dicts site-name -> [tokens, d] float32 tensors whose rows are the same tokens
for every site (so transcoders see aligned input/output pairs). Rows with NaN/Inf, special
tokens or (optionally) outlier norms never leave the source; the NaN/Inf ones are counted.
An LLM source asked for `grad_sites` (gsae SAEs) also yields, in its train split,
d(LM loss)/d(activation) under `grad_key(site)`, row-aligned; `dims` lists only sites.
"""

from __future__ import annotations

import abc
import itertools
import logging
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from framework import hooks, text_data
from framework.schema import ConfigError, DataConfig
from framework.errors import DataError
from framework.stateful import Saved, State, StateDict
from framework.lm_grads import GRAD_SUFFIX, grad_key, lm_site_grads

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


SKIP_REASONS = ("nonfinite", "outlier", "lockstep")  # why a row never reached an SAE


def outlier_rows(acts: Batch, factor: float, good: torch.Tensor) -> torch.Tensor:
    """Rows whose norm at any site exceeds `factor` x that site's median norm over the `good`
    rows (attention sinks and other massive activations). The same rule decides which
    positions the splice metrics replace, so every metric sees one token population."""
    out = torch.zeros_like(good)
    if factor <= 0 or not bool(good.any()):
        return out
    for k, v in acts.items():
        if k.endswith(GRAD_SUFFIX):  # a large LM-loss gradient is no reason to drop a token
            continue
        norms = v.norm(dim=1)
        out |= norms > factor * norms[good].median()
    return out & good


class ActivationSource(abc.ABC):
    """Base: subclasses implement `_raw(split)`, the position methods, and set `dims` (site -> width).

    `skipped[split][reason]` counts rows (tokens) removed before any SAE saw them, with reason
    in SKIP_REASONS. Each row is counted once: the train stream counts what it streamed (a
    later epoch over the same files counts its rows again), and the eval counts are those of
    the latest pass over the held-out split (every evaluation reads the same rows)."""

    dims: dict[str, int]
    can_splice = False  # capability: evaluation can splice reconstructions into the model (see LLMSource.logits)

    def __init__(self, data_cfg: DataConfig, device: torch.device, rank: int = 0, world: int = 1):
        self.data_cfg = data_cfg
        self.device = device
        self.rank, self.world = rank, world  # this process reads every world-th document/chunk
        self.skipped = {split: dict.fromkeys(SKIP_REASONS, 0) for split in ("train", "eval")}

    @abc.abstractmethod
    def _raw(self, split: str) -> Iterator[Batch]:
        ...

    @abc.abstractmethod
    def position_dict(self) -> dict:
        ...

    @abc.abstractmethod
    def load_position(self, position: dict) -> None:
        ...

    def eval_tokens_available(self, limit: int) -> int:
        """Held-out tokens this rank can evaluate on, counted up to `limit` (before NaN/outlier
        filtering, which needs the activations)."""
        return limit

    def downstream_metrics(self, trainers: dict, n_tokens: int, reduce) -> dict[str, dict[str, float]]:
        """Per SAE, what its reconstruction changes downstream of its site (a vision encoder:
        the final embedding); none for sources without a model to splice into."""
        return {}

    def stream_state(self) -> dict:
        """JSON-able: the train stream's position and its skip counters."""
        return {"position": self.position_dict(), "rank": self.rank, "world": self.world,
                "skipped": dict(self.skipped["train"])}

    def load_stream_state(self, state: dict) -> None:
        """Before `batches("train")` is called: the train stream continues after `state`.
        The position must come from the same rank of the same world size (see merge_positions)."""
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(f"data position of rank {state['rank']}/{state['world']} loaded on rank "
                             f"{self.rank}/{self.world}")
        self.load_position(state["position"])
        self.skipped["train"] = {**dict.fromkeys(SKIP_REASONS, 0), **state.get("skipped", {})}

    # -- Stateful (framework/stateful.py): a local part per rank
    def state_dict(self) -> StateDict:
        return StateDict(local=State(meta=self.stream_state()))

    def load_state_dict(self, saved: Saved) -> None:
        """Exactly this rank's stream on the same layout; under another world size or placement
        the streams go on from the furthest position any rank reached (merge_positions), and
        rank 0 keeps the skip counters' totals (they are summed over ranks at the end)."""
        mine = saved.mine()
        if mine is not None:
            self.load_stream_state(mine.meta)
            return
        old = [part.meta for part in saved.local if part is not None]
        self.load_position(merge_positions([m["position"] for m in old]))
        if saved.rank == 0:
            for m in old:
                for reason, count in m.get("skipped", {}).items():
                    self.skipped["train"][reason] += count

    def batches(self, split: str = "train") -> Iterator[Batch]:
        if split == "eval":
            self.skipped["eval"] = dict.fromkeys(SKIP_REASONS, 0)
        for acts in self._raw(split):
            acts = self._clean(acts, self.skipped[split])
            if next(iter(acts.values())).shape[0]:
                yield acts

    def _clean(self, acts: Batch, skipped: dict[str, int]) -> Batch:
        acts = {k: v.to(self.device, torch.float32, non_blocking=True) for k, v in acts.items()}
        good = torch.ones(next(iter(acts.values())).shape[0], dtype=torch.bool, device=self.device)
        for v in acts.values():
            good &= torch.isfinite(v).all(dim=1)
        n_bad = int((~good).sum())
        if n_bad:
            skipped["nonfinite"] += n_bad
            log.warning("skipped %d tokens with NaN/Inf activations (%d so far in this pass)", n_bad,
                        skipped["nonfinite"])
        outliers = outlier_rows(acts, self.data_cfg.norm_outlier_factor, good)
        skipped["outlier"] += int(outliers.sum())
        good &= ~outliers
        return {k: v[good] for k, v in acts.items()}


class LLMSource(ActivationSource):
    """Activations of a frozen LLM on packed text; the forward stops after the last site,
    except for train batches when `grad_sites` asks for LM-loss gradients (a full forward and
    an activation-only backward, see framework/variants/gsae.py).

    A ZeRO-3 sharded model (framework/llm.py) makes every forward a collective, so with several
    ranks the source keeps them in lockstep: every LLM batch is cut to the smallest row count
    any rank has (`sequences`), a stream ends on all ranks when it ends on one, and each
    activation batch is cut to the smallest row count after cleaning (`_clean`), so the
    mixing buffers, hence the SAE steps and the LLM forwards, stay aligned across ranks."""

    def __init__(self, data_cfg: DataConfig, model, tokenizer, sites: list[str], device: torch.device, seed: int,
                 rank: int = 0, world: int = 1, grad_sites: list[str] = ()):
        super().__init__(data_cfg, device, rank, world)
        self.model, self.tokenizer, self.seed = model, tokenizer, seed
        self.sites = list(sites)
        self.specs = list({spec.name: spec for s in sites for spec in hooks.parse_sites(s)}.values())  # stacked: members
        for spec in self.specs:
            hooks.resolve(model, spec)  # unknown layers/modules fail here, before training
        self.grad_sites = list(dict.fromkeys(grad_sites))
        if self.grad_sites:
            from framework.llm import is_causal_lm  # noqa: PLC0415

            missing = sorted(set(self.grad_sites) - set(sites))
            if missing:
                raise ValueError(f"grad_sites {missing} are not among the captured sites {sorted(sites)}")
            if not is_causal_lm(model):
                raise ConfigError(f"gsae needs a causal LM's next-token loss; model type '{model.config.model_type}' "
                                  "has no LM head")
        from framework.llm import zero3_engine  # noqa: PLC0415

        # the model's group is every process (latent-shard groups read one stream: already equal)
        self.lockstep = zero3_engine(model) is not None and dist.is_initialized() and dist.get_world_size() > 1
        self.specials = text_data.special_token_ids(tokenizer)
        _check_context_size(model, data_cfg.context_size)
        self.dims = self._probe_dims()
        self.tokens_seen = 0
        self.position = text_data.TextPosition()  # of the train stream

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _probe_dims(self) -> dict[str, int]:
        ids = torch.full((1, 4), self.tokenizer.bos_token_id or 0, dtype=torch.long)
        acts = self.capture(ids)
        return {k: v.shape[-1] for k, v in acts.items()}

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> Batch:
        """site -> [batch, seq, d] for a token batch, running the model only as deep as needed."""
        ids = ids.to(self.model_device)
        with hooks.capture(self.model, self.specs) as store:
            hooks.run_until_captured(lambda: self.model(input_ids=ids, use_cache=False))
        return hooks.stack_captured(store, self.sites)

    def capture_with_grads(self, ids: torch.Tensor, loss_mask: torch.Tensor) -> Batch:
        """Every site's activations and, under grad_key(site), d(LM loss)/d(activation) for the
        grad sites ([batch, seq, d]), from one full forward and backward; the loss counts the
        predictions of `loss_mask` tokens."""
        ids = ids.to(self.model_device)
        with hooks.capture(self.model, self.specs, stop_early=False) as store:
            _, grads, _ = lm_site_grads(self.model, ids, self.grad_sites, loss_mask=loss_mask)
        return {**hooks.stack_captured(store, self.sites), **{grad_key(s): g for s, g in grads.items()}}

    def sequences(self, split: str) -> Iterator[torch.Tensor]:
        """Token batches; the train split continues from (and advances) `self.position`."""
        position = self.position if split == "train" else None
        seqs = text_data.sequence_batches(self.data_cfg, self.tokenizer, split, self.seed, self.rank, self.world,
                                          position)
        return _lockstep_sequences(seqs, self.device) if self.lockstep else seqs

    def _clean(self, acts: Batch, skipped: dict[str, int]) -> Batch:
        acts = super()._clean(acts, skipped)
        return self._level(acts, skipped) if self.lockstep else acts

    def _level(self, acts: Batch, skipped: dict[str, int]) -> Batch:
        """Cut to the smallest row count of all ranks, dropping evenly spread rows (not the
        last positions)."""
        rows = next(iter(acts.values())).shape[0]
        least = torch.tensor([rows], device=self.device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        keep = int(least)
        if keep == rows:
            return acts
        skipped["lockstep"] += rows - keep
        idx = torch.arange(keep, device=self.device) * rows // keep
        return {k: v[idx] for k, v in acts.items()}

    @property
    def can_splice(self) -> bool:
        from framework.llm import is_causal_lm  # noqa: PLC0415

        return is_causal_lm(self.model)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, replacement: hooks.Replacement | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits on a token batch; with a `replacement`, its output sites replaced
        at `positions` by its predictions (hooks.splice_prediction; the other positions keep
        their clean activation)."""
        ids = ids.to(self.model_device)
        if replacement is None:
            return self.model(input_ids=ids, use_cache=False).logits
        with hooks.splice_prediction(self.model, replacement, positions):
            return self.model(input_ids=ids, use_cache=False).logits

    @torch.no_grad()
    def sae_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] bool: the positions of a token batch whose activations reach the SAEs
        (not special, finite, not a norm outlier: the rule of `batches`). Eval splicing
        replaces exactly these, so ΔCE/KL and FVU/L0 are measured on one token population."""
        keep = text_data.keep_mask(ids, self.specials, self.data_cfg.exclude_special_tokens).to(self.model_device)
        acts = {k: v[keep].float() for k, v in self.capture(ids).items()}
        good = torch.ones(int(keep.sum()), dtype=torch.bool, device=keep.device)
        for v in acts.values():
            good &= torch.isfinite(v).all(dim=1)
        good &= ~outlier_rows(acts, self.data_cfg.norm_outlier_factor, good)
        out = torch.zeros_like(keep)
        out[keep] = good
        return out

    def eval_tokens_available(self, limit: int) -> int:
        """Tokenises (no LLM forward) this rank's held-out sequences until `limit` SAE positions."""
        count = 0
        seqs = text_data.sequence_batches(self.data_cfg, self.tokenizer, "eval", self.seed, self.rank, self.world)
        for ids in seqs:
            count += int(text_data.keep_mask(ids, self.specials, self.data_cfg.exclude_special_tokens).sum())
            if count >= limit:
                break
        return count

    def position_dict(self) -> dict:
        return {"kind": "text", **self.position.state_dict(), "tokens_seen": self.tokens_seen}

    def load_position(self, position: dict) -> None:
        check_position_kind(position, "text")
        self.position = text_data.TextPosition.from_state_dict(position)
        self.tokens_seen = position.get("tokens_seen", 0)

    def _raw(self, split: str) -> Iterator[Batch]:
        with_grads = bool(self.grad_sites) and split == "train"  # evaluation is plain TopK: no gradients
        for ids in self.sequences(split):
            keep = text_data.keep_mask(ids, self.specials, self.data_cfg.exclude_special_tokens).to(self.model_device)
            acts = self.capture_with_grads(ids, keep) if with_grads else self.capture(ids)
            self.tokens_seen += ids.numel()
            yield {k: v[keep] for k, v in acts.items()}


def _check_context_size(model, context_size: int) -> None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and context_size > limit:
        raise ConfigError(f"data.context_size={context_size} is longer than the model's {limit} positions "
                          f"({getattr(config, 'model_type', 'model')} max_position_embeddings); use at most {limit}")


def _lockstep_sequences(seqs: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Token batches cut to the fewest sequences any rank has; ends everywhere once one rank's
    stream ends (one all-reduce per batch). Every rank then runs the same forwards."""
    for ids in itertools.chain(seqs, [None]):
        least = torch.tensor([0 if ids is None else ids.shape[0]], device=device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        if int(least) == 0:
            return
        yield ids[: int(least)]


# --------------------------------------------------------------------------- files

ACTIVATION_SUFFIXES = (".safetensors", ".npy")
FILE_READ_ROWS = 4096  # rows per read from a memory-mapped shard


class _Shard:
    """A memory-mapped activation shard: site -> array-like [N, d] read lazily. Nothing in it
    is ever unpickled: .npy object arrays are refused, safetensors hold plain tensors."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors = {"activations": _open_npy(path)} if path.suffix == ".npy" else _open_safetensors(path)
        for name, t in self.tensors.items():
            shape = self._shape(t)
            if len(shape) != 2:
                raise ConfigError(f"activation shard '{path}': tensor '{name}' has shape {shape}, expected [N, d]")
        rows = {self._shape(t)[0] for t in self.tensors.values()}
        if len(rows) != 1:
            raise ConfigError(f"activation shard '{path}' is ragged: its tensors have different row counts {sorted(rows)}")
        self.rows = rows.pop()

    @staticmethod
    def _shape(t) -> tuple[int, ...]:
        return tuple(t.shape) if hasattr(t, "shape") else tuple(t.get_shape())

    def widths(self) -> dict[str, int]:
        return {k: self._shape(t)[1] for k, t in self.tensors.items()}

    def read(self, start: int, stop: int) -> Batch:
        return {k: torch.from_numpy(np.array(t[start:stop])) if isinstance(t, np.ndarray) else t[start:stop]
                for k, t in self.tensors.items()}


def _open_npy(path: Path) -> np.ndarray:
    """A float .npy array, memory-mapped; anything else (text, object arrays, a truncated file)
    is a DataError naming the file (allow_pickle stays False: nothing is unpickled)."""
    def refuse(why: str):
        return DataError(f"activation shard '{path}': {why}; shards must be float arrays saved with numpy.save "
                         "or safetensors")

    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise refuse("not a .npy file (no NUMPY header)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        holds_objects = "object" in str(err) or "pickle" in str(err)
        raise refuse("it holds Python objects, which are never loaded" if holds_objects
                     else "truncated or damaged") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise refuse(f"it holds dtype {arr.dtype}")
    return arr


def _open_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        handle = safe_open(str(path), framework="pt")
        return {k: handle.get_slice(k) for k in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise DataError(f"activation shard '{path}': not a readable safetensors file ({err})") from None


class FileSource(ActivationSource):
    """Cached activations: a folder of .safetensors (one tensor per site) or .npy shards.
    The last `eval_rows` rows (in file-name order) are held out for evaluation."""

    def __init__(self, data_cfg: DataConfig, device: torch.device, seed: int, eval_rows: int,
                 rank: int = 0, world: int = 1):
        super().__init__(data_cfg, device, rank, world)
        folder = Path(data_cfg.activations_dir)
        paths = sorted(p for p in folder.iterdir() if p.suffix in ACTIVATION_SUFFIXES)
        if not paths:
            raise ConfigError(f"data.activations_dir: no {' or '.join(ACTIVATION_SUFFIXES)} files in '{folder}'")
        self.shards = [_Shard(p) for p in paths]
        self.dims = self.shards[0].widths()
        for shard in self.shards[1:]:
            if shard.widths() != self.dims:
                raise ConfigError(
                    f"activation shard '{shard.path}' has tensors/widths {shard.widths()}, but '{paths[0].name}' has {self.dims}")
        total = sum(s.rows for s in self.shards)
        if eval_rows >= total:
            raise ConfigError(f"eval.tokens={eval_rows} leaves no training rows: the files hold {total} rows")
        self.seed = seed
        self.train_ranges, self.eval_ranges = self._split(eval_rows)
        self.position = {"epoch": 0, "index": 0}  # train stream: epoch, next global chunk index

    def eval_tokens_available(self, limit: int) -> int:
        return min(limit, sum(e - s for _, s, e in self._chunks(self.eval_ranges, None)[self.rank::self.world]))

    def position_dict(self) -> dict:
        return {"kind": "files", **self.position}

    def load_position(self, position: dict) -> None:
        check_position_kind(position, "files")
        self.position = {"epoch": position["epoch"], "index": position["index"]}

    def _split(self, eval_rows: int):
        train, held = [], []
        remaining = eval_rows
        for i in reversed(range(len(self.shards))):
            rows = self.shards[i].rows
            take = min(rows, remaining)
            remaining -= take
            if take:
                held.insert(0, (i, rows - take, rows))
            if rows - take:
                train.insert(0, (i, 0, rows - take))
        return train, held

    def _chunks(self, ranges, rng: random.Random | None):
        """Every chunk of the split in reading order (all ranks'; this rank takes every world-th)."""
        chunks = [(i, s, min(s + FILE_READ_ROWS, stop)) for i, start, stop in ranges for s in range(start, stop, FILE_READ_ROWS)]
        if rng is not None:
            rng.shuffle(chunks)
        return chunks

    def _raw(self, split: str) -> Iterator[Batch]:
        if split == "eval":
            for i, s, e in self._chunks(self.eval_ranges, None)[self.rank::self.world]:
                yield self.shards[i].read(s, e)
            return
        epoch, start = self.position["epoch"], self.position["index"]
        while True:
            rng = random.Random(self.seed + epoch) if self.data_cfg.shuffle_files else None
            chunks = self._chunks(self.train_ranges, rng)
            first = start + (self.rank - start) % self.world  # this rank's first chunk >= start
            for j in range(first, len(chunks), self.world):
                self.position = {"epoch": epoch, "index": j + 1}
                i, s, e = chunks[j]
                yield self.shards[i].read(s, e)
            epoch, start = epoch + 1, 0


def check_position_kind(position: dict, kind: str) -> None:
    if position.get("kind") != kind:
        raise ValueError(f"a data position of kind '{position.get('kind')}' cannot continue a '{kind}' source")


def merge_positions(positions: list[dict]) -> dict:
    """One rank's position for continuing, under another world size, streams that `positions`
    (one per old rank) describe: the furthest epoch/index any old rank reached. Documents or
    chunks below it that a lagging rank had not reached yet are skipped, nothing is repeated;
    the packers' leftover tokens are dropped."""
    furthest = max(positions, key=lambda p: (p["epoch"], p["index"]))
    out = {k: v for k, v in furthest.items()}
    if out["kind"] == "text":
        out.update(leftover=[], sequences=0, batches=0, tokens_seen=0)
    return out
