"""Activation store: the frozen LLM's activations cached once, read by any number of trainings.

A store is one folder. Each shard (`<split>-r<rank>-<index>.safetensors`) holds every cached
site as one [rows, width] tensor, row-aligned (row i of every site is the same token), so a
transcoder and many SAEs read one store. Shards have `cache.shard_rows` rows; only the last of
each split and writing rank may be shorter. `manifest.json` lists every shard with its row
count, size and sha256, the sites and widths, the dtype, the held-out split, and the model /
data / hook provenance; a store without it is incomplete (caching was interrupted: rerun it).

Writing (`StoreWriter`, `sparsemill cache`): every rank of a launch (RANK / WORLD_SIZE) caches
its share of the documents into its own shards and keeps its own journal
(`writer-r<rank>.json`): the shards it published and where the next shard starts in its LLM
stream (the text position before the batch that shard starts in, and the rows of that batch
already written). A shard is written to a temporary file, fsynced and renamed; the journal is
replaced atomically after each shard. A writer killed at any moment resumes from its journal:
a file renamed but not yet journalled is written again under the same name, so no row is
missing or duplicated. The last rank to finish writes manifest.json. The held-out split is
cached first (a killed writer re-derives it: one pass over the eval documents, skipping the
rows its shards hold).

Reading (`StoreSource`, data.source=store): the manifest is checked against the config before
training (sites, widths, model, dtype, every shard present at its recorded size); each shard's
sha256 is verified when it is loaded, in a background thread that loads the next shard while
the current one is read, before any of its rows are used. Shard order per epoch and row order
within a shard are seeded (data.shuffle_files, data.shuffle_rows) and the position (epoch,
shard, row) resumes exactly. A store with fewer train rows than train.total_tokens is read
again in further epochs (warned at the start, each new epoch logged), as the text source does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from framework import durable
from framework.activations import ActivationSource, Batch, FILE_READ_ROWS, LLMSource, check_position_kind
from framework.errors import ConfigError, DataError
from framework.schema import DataConfig, RunConfig
from framework.stateful import Loaded, Saved, State, StateDict

log = logging.getLogger("sparsemill")

FORMAT, VERSION = "sparsemill-activation-store", 1
MANIFEST = "manifest.json"
SPLITS = ("eval", "train")  # writing order: the held-out split first (a resumed writer re-derives it)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
KILL_ENV = "SPARSEMILL_CACHE_KILL"  # test hook "N:written" / "N:renamed": SIGKILL at the Nth shard
# the data keys that decide which rows a store holds (the provenance a resumed writer must match)
DATA_KEYS = ("paths", "text_field", "tokens_field", "split", "context_size", "prepend_bos", "separator",
             "exclude_special_tokens", "norm_outlier_factor", "llm_batch_size", "shuffle_files")


def configured_sites(cfg: RunConfig) -> list[str]:
    """Every site an SAE of the config reads (input and transcoder output)."""
    return sorted({site for s in cfg.saes for site in (s.site, s.output_site) if site})


def shard_name(split: str, rank: int, index: int) -> str:
    return f"{split}-r{rank:05d}-{index:06d}.safetensors"


def journal_name(rank: int) -> str:
    return f"writer-r{rank:05d}.json"


def provenance(cfg: RunConfig, dims: dict[str, int], world: int) -> dict:
    """What a store holds and how it was made; a resumed writer must find the same."""
    return {"format": FORMAT, "version": VERSION, "dtype": cfg.cache.dtype, "shard_rows": cfg.cache.shard_rows,
            "sites": dict(sorted(dims.items())), "world": world,
            "model": {"name": cfg.model.name, "dtype": cfg.model.dtype, "seed": cfg.train.seed},
            "data": {k: getattr(cfg.data, k) for k in DATA_KEYS},
            "hooks": "framework/hooks.py site names; rows are the positions of text_data.keep_mask (no BOS/special "
                     "tokens), NaN/Inf and norm-outlier rows removed (framework/activations.py)",
            "held_out": "eval split: documents whose crc32 % 100 < text_data.EVAL_PERCENT (framework/text_data.py)"}


# --------------------------------------------------------------------------- writing


def _kill_point(stage: str, published: int) -> None:
    """Test hook: SIGKILL this process at the Nth shard, after its temporary file is `written`
    or after it is `renamed` (but before the journal records it)."""
    spec = os.environ.get(KILL_ENV, "")
    if spec and spec == f"{published}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def _rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


class StoreWriter:
    """One rank's shards and journal. Stateful: its state is the journal (shards, resume point,
    finished splits), saved after every shard and restored by `load_state_dict`."""

    def __init__(self, folder: Path, header: dict, rank: int, world: int, targets: dict[str, int]):
        self.folder, self.header, self.rank, self.world = folder, header, rank, world
        self.targets = targets  # rows this rank writes per split
        self.dtype = DTYPES[header["dtype"]]
        self.shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
        self.resume: dict | None = None  # {"split", "state" (text stream position or None), "skip"}
        self.done: dict[str, bool] = dict.fromkeys(SPLITS, False)
        self.skipped: dict[str, dict] = {}
        self.timing = {"forward_s": 0.0, "write_s": 0.0, "rows": 0}  # this process's, for the summary

    # -- Stateful
    def state_dict(self) -> StateDict:
        meta = {"header": self.header, "rank": self.rank, "targets": self.targets, "shards": self.shards,
                "resume": self.resume, "done": self.done, "skipped": self.skipped}
        return StateDict(local=State(meta=meta))

    def load_state_dict(self, saved: Saved) -> None:
        meta = saved.mine().meta
        if meta["header"] != self.header or meta["targets"] != self.targets:
            diff = sorted(k for k in {**meta["header"], **self.header} if meta["header"].get(k) != self.header.get(k))
            raise ConfigError(f"data.store_dir: '{self.folder}' holds a store being written with another configuration "
                              f"(differs in: {', '.join(diff) or 'cache.tokens / cache.eval_tokens'}); use another "
                              "folder, or the config it was started with")
        self.shards, self.resume, self.done = meta["shards"], meta["resume"], meta["done"]
        self.skipped = meta.get("skipped", {})

    @property
    def journal(self) -> Path:
        return self.folder / journal_name(self.rank)

    def open(self) -> bool:
        """Continue this rank's journal if there is one; True when resuming."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.journal.is_file():
            return False
        try:
            meta = json.loads(self.journal.read_text())
        except json.JSONDecodeError as err:  # never: the journal is replaced atomically
            raise DataError(f"activation store journal '{self.journal}' is unreadable ({err})") from None
        self.load_state_dict(Saved(None, [Loaded({}, meta)], 0, True))
        return True

    def _save_journal(self) -> None:
        _disk_full_is_a_data_error(lambda: durable.atomic_write_text(
            self.journal, json.dumps(self.state_dict().local.meta, indent=1)), self.journal)

    def written(self, split: str) -> int:
        return sum(e["rows"] for e in self.shards[split])

    def rows_left(self) -> int:
        return sum(self.targets[s] - self.written(s) for s in SPLITS if not self.done[s])

    def check_disk_space(self) -> None:
        """Refuse to start when the rows still to write cannot fit on the store's disk."""
        row_bytes = sum(self.header["sites"].values()) * self.dtype.itemsize
        need = self.rows_left() * row_bytes * self.world  # every rank writes a like share into this folder
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise DataError(f"data.store_dir: '{self.folder}' has {free / 2**30:.3f} GiB free, the store needs about "
                            f"{need / 2**30:.3f} GiB more ({self.rows_left():,} rows x {row_bytes:,} bytes x "
                            f"{self.world} rank(s)); free space, lower cache.tokens, or use cache.dtype=bfloat16")

    def fill(self, split: str, source: LLMSource, bar=None) -> None:
        """Write `split` until this rank's target rows (or the end of the held-out split)."""
        target, written = self.targets[split], self.written(split)
        resume = self.resume if self.resume and self.resume["split"] == split else None
        if resume and resume["state"] is not None:
            source.load_stream_state(resume["state"])
        skip = resume["skip"] if resume else 0  # rows already in shards: of the first batch, or of the eval pass
        pending: list[Batch] = []
        n_pending = 0
        before = source.stream_state() if split == "train" else None  # the position before the next batch
        batches = source.batches(split)
        tick = time.perf_counter()
        for acts in batches:
            self.timing["forward_s"] += time.perf_counter() - tick
            n = _rows(acts)
            lo = min(skip, n)
            skip -= lo
            first = lo
            while lo < n and written + n_pending < target:
                take = min(n - lo, self.header["shard_rows"] - n_pending, target - written - n_pending)
                pending.append({k: v[lo:lo + take] for k, v in acts.items()})
                n_pending, lo = n_pending + take, lo + take
                if n_pending == self.header["shard_rows"] or written + n_pending == target:
                    if split == "train":  # where the next shard starts
                        nxt = {"state": source.stream_state(), "skip": 0} if lo == n else {"state": before, "skip": lo}
                    else:
                        nxt = {"state": None, "skip": written + n_pending}
                    self._publish(split, pending, {"split": split, **nxt}, source)
                    written, pending, n_pending = written + n_pending, [], 0
            if bar is not None:
                bar.update(lo - first)
            if written >= target:
                break
            before = source.stream_state() if split == "train" else None
            tick = time.perf_counter()
        batches.close()
        if pending:  # the held-out split ended before its target
            self._publish(split, pending, {"split": split, "state": None, "skip": written + n_pending}, source)
        self.done[split] = True
        self._save_journal()

    def _publish(self, split: str, pending: list[Batch], resume: dict, source: LLMSource) -> None:
        from safetensors.torch import save  # noqa: PLC0415

        tick = time.perf_counter()
        tensors = {k: torch.cat([p[k] for p in pending]).to("cpu", self.dtype).contiguous() for k in pending[0]}
        data = save(tensors, metadata={"format": FORMAT, "split": split, "rank": str(self.rank)})
        name = shard_name(split, self.rank, len(self.shards[split]))
        tmp, final = self.folder / f".tmp-{name}", self.folder / name
        count = sum(len(v) for v in self.shards.values()) + 1

        def write() -> None:
            try:
                durable.write_file(tmp, data)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a partial shard is never visible, not even as a temporary file
                raise

        _disk_full_is_a_data_error(write, final)
        _kill_point("written", count)
        os.replace(tmp, final)
        durable.fsync_dir(self.folder)
        _kill_point("renamed", count)
        rows = _rows(tensors)
        self.shards[split].append({"file": name, "rows": rows, "size": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()})
        self.resume = resume
        self.skipped = {split: dict(source.skipped[split]) for split in SPLITS}
        self._save_journal()
        self.timing["write_s"] += time.perf_counter() - tick
        self.timing["rows"] += rows

    def finish(self) -> Path | None:
        """The manifest, written by whichever rank finds every rank's journal finished (each rank
        marks itself done first, so the last one to finish always does)."""
        journals = [self.folder / journal_name(r) for r in range(self.world)]
        metas = [json.loads(j.read_text()) for j in journals if j.is_file()]
        if len(metas) < self.world or not all(all(m["done"].values()) for m in metas):
            return None
        manifest = {**self.header,
                    "splits": {s: [e for m in metas for e in m["shards"][s]] for s in SPLITS},
                    "rows": {s: sum(e["rows"] for m in metas for e in m["shards"][s]) for s in SPLITS},
                    "skipped_rows": [m.get("skipped", {}) for m in metas],
                    "versions": _versions()}
        path = self.folder / MANIFEST
        _disk_full_is_a_data_error(lambda: durable.atomic_write_text(path, json.dumps(manifest, indent=1)), path)
        return path


def _disk_full_is_a_data_error(write, path: Path) -> None:
    try:
        write()
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DataError(f"the disk is full: '{path}' could not be written; the store keeps every shard finished so "
                        "far (no partial shard is visible); free space and rerun `sparsemill cache` with the same "
                        "config to continue") from None


def _versions() -> dict:
    import transformers  # noqa: PLC0415

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def cache(cfg: RunConfig, rank: int = 0, world: int = 1) -> dict:
    """`sparsemill cache`: this rank's share of the activation store (see the module docstring)."""
    from framework.llm import load_frozen  # noqa: PLC0415
    from framework.rng import seed_everything  # noqa: PLC0415

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and torch.cuda.device_count() > local:
        torch.cuda.set_device(local)  # torchrun: each rank's model on its own GPU ("cuda" = the current one)
    seed_everything(cfg.train.seed)
    model, tokenizer = load_frozen(cfg.model, seed=cfg.train.seed)
    source = LLMSource(cfg.data, model, tokenizer, configured_sites(cfg), torch.device("cpu"), cfg.train.seed,
                       rank, world)
    tokens = cfg.cache.tokens or cfg.train.total_tokens
    eval_tokens = cfg.cache.eval_tokens or cfg.eval.tokens
    targets = {"train": tokens // world + (rank < tokens % world), "eval": eval_tokens // world + (rank < eval_tokens % world)}
    writer = StoreWriter(Path(cfg.data.store_dir), provenance(cfg, source.dims, world), rank, world, targets)
    resumed = writer.open()
    if resumed:
        log.info("resuming the activation store in %s: %d shards written", writer.folder,
                 sum(len(v) for v in writer.shards.values()))
    writer.check_disk_space()
    bar = None
    if cfg.log.progress and rank == 0:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=sum(targets.values()), initial=sum(targets.values()) - writer.rows_left(), unit="tok",
                   unit_scale=True, desc="caching", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for split in SPLITS:
            if not writer.done[split]:
                writer.fill(split, source, bar)
    finally:
        if bar is not None:
            bar.close()
    if not writer.shards["eval"]:
        raise DataError(f"the held-out split of data.paths {cfg.data.paths} holds no usable tokens: a store trained "
                        "from would evaluate on nothing; add data (more or longer documents)")
    seconds = time.perf_counter() - start
    manifest = writer.finish()
    t = writer.timing
    return {"store": str(writer.folder), "rank": rank, "world": world, "manifest": str(manifest) if manifest else None,
            "rows": {s: writer.written(s) for s in SPLITS}, "sites": writer.header["sites"], "dtype": writer.header["dtype"],
            "rows_this_run": t["rows"], "seconds": round(seconds, 2),
            "tokens_per_s": round(t["rows"] / max(seconds, 1e-9), 1),
            "forward_tokens_per_s": round(t["rows"] / max(t["forward_s"], 1e-9), 1),
            "write_tokens_per_s": round(t["rows"] / max(t["write_s"], 1e-9), 1),
            "bytes": sum(e["size"] for v in writer.shards.values() for e in v)}


def format_cache_summary(s: dict) -> str:
    return (f"cached {s['rows_this_run']:,} rows in {s['seconds']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s; LLM forward "
            f"{s['forward_tokens_per_s']:,.0f} tokens/s, shard writes {s['write_tokens_per_s']:,.0f} tokens/s) into "
            f"{s['store']} ({s['dtype']}, sites {s['sites']}): train {s['rows']['train']:,} rows, eval "
            f"{s['rows']['eval']:,} rows on this rank"
            + ("" if s["manifest"] else "; the manifest is written by the last rank to finish"))


# --------------------------------------------------------------------------- reading


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        partial = sorted(p.name for p in folder.glob("writer-r*.json"))
        raise DataError(f"data.store_dir: '{folder}' has no {MANIFEST}" + (
            f": caching was interrupted or is still running ({', '.join(partial)}); rerun `sparsemill cache` with the "
            "same config to finish it" if partial else "; it is not an activation store (write one with `sparsemill cache`)"))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"activation store manifest '{path}' is not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"'{path}' is not an activation store manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise DataError(f"activation store '{folder}' has format version {manifest.get('version')}; this sparsemill "
                        f"reads version {VERSION}; cache it again")
    if manifest.get("dtype") not in DTYPES:
        raise DataError(f"activation store '{folder}' holds dtype {manifest.get('dtype')!r}; accepted: {sorted(DTYPES)}")
    return manifest


def check_store_matches(manifest: dict, cfg: RunConfig, folder: Path) -> None:
    """Before training: the store comes from the configured model, and holds every site."""
    made = manifest["model"]
    from framework.llm import TINY_MODELS  # noqa: PLC0415

    if made["name"] != cfg.model.name:
        raise ConfigError(f"model.name: '{cfg.model.name}', but the activation store '{folder}' was cached from "
                          f"'{made['name']}'; set model.name={made['name']} or cache this model")
    if made["name"] in TINY_MODELS and made["seed"] != cfg.train.seed:  # random weights drawn from the seed
        raise ConfigError(f"train.seed={cfg.train.seed}, but the activation store '{folder}' was cached from "
                          f"{made['name']} drawn with seed {made['seed']} (another model)")
    for i, s in enumerate(cfg.saes):
        for key in ("site", "output_site"):
            site = getattr(s, key)
            if site and site not in manifest["sites"]:
                raise ConfigError(f"saes.{i}.{key}: '{site}' is not in the activation store '{folder}', which holds "
                                  f"{sorted(manifest['sites'])}")


def _load_shard(folder: Path, entry: dict, sites: list[str], widths: dict[str, int], dtype: str) -> Batch:
    """A shard's tensors for `sites`, after its sha256 matched the manifest (runs in the prefetch
    thread: hashing reads the file, so the memory-mapped reads after it come from the page cache)."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    path = folder / entry["file"]
    try:
        digest = durable.hash_file(path)
    except FileNotFoundError:
        raise DataError(f"activation store shard '{path}' is missing") from None
    if digest != {"size": entry["size"], "sha256": entry["sha256"]}:
        raise DataError(f"activation store shard '{path}' does not match the manifest (size {digest['size']} vs "
                        f"{entry['size']}, sha256 differs: {digest['sha256'] != entry['sha256']}): it was truncated, "
                        "damaged or replaced; cache the store again")
    try:
        with safe_open(str(path), framework="pt") as handle:
            out = {}
            for site in sites:
                sl = handle.get_slice(site)
                got = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype()))
                if got != ((entry["rows"], widths[site]), dtype):
                    raise DataError(f"activation store shard '{path}': '{site}' is {got}, the manifest says "
                                    f"{((entry['rows'], widths[site]), dtype)}")
                out[site] = handle.get_tensor(site)
            return out
    except SafetensorError as err:
        raise DataError(f"activation store shard '{path}' is not readable safetensors ({err})") from None


class StoreSource(ActivationSource):
    """An activation store as a source (see the module docstring). Position: the epoch, the
    shard (its index in that epoch's order over every shard; this rank reads every world-th)
    and the rows of it already read."""

    def __init__(self, data_cfg: DataConfig, device: torch.device, seed: int, manifest: dict,
                 sites: list[str], rank: int = 0, world: int = 1):
        super().__init__(data_cfg, device, rank, world)
        self.folder, self.seed, self.manifest = Path(data_cfg.store_dir), seed, manifest
        self.dims = dict(manifest["sites"])
        self.sites = sites or list(self.dims)  # read only what the SAEs use
        self.train, self.eval = manifest["splits"]["train"], manifest["splits"]["eval"]
        for entry in self.train + self.eval:  # a missing or truncated shard fails now, not hours in
            path = self.folder / entry["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["size"]:
                raise DataError(f"activation store shard '{path}' is " + (
                    "missing" if size is None else f"truncated or damaged ({size} bytes, the manifest says "
                    f"{entry['size']})") + "; cache the store again")
        if len(self.train) < world:
            raise DataError(f"activation store '{self.folder}' has {len(self.train)} train shards for {world} ranks "
                            "reading it; cache it with a smaller cache.shard_rows")
        self.position = {"epoch": 0, "index": 0, "row": 0}

    @property
    def train_rows(self) -> int:
        return self.manifest["rows"]["train"]

    def position_dict(self) -> dict:
        return {"kind": "store", **self.position}

    def load_position(self, position: dict) -> None:
        check_position_kind(position, "store")
        self.position = {"epoch": position["epoch"], "index": position["index"], "row": position.get("row", 0)}

    def eval_tokens_available(self, limit: int) -> int:
        return min(limit, sum(e["rows"] for e in self.eval[self.rank::self.world]))

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train)))
        if self.data_cfg.shuffle_files:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def _plan(self) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, index, shard, first row) of this rank's shards from the position on, forever."""
        epoch, index, row = self.position["epoch"], self.position["index"], self.position["row"]
        while True:
            for j, shard in enumerate(self._order(epoch)):
                if j % self.world == self.rank and j >= index:
                    yield epoch, j, shard, row if j == index else 0
            epoch, index, row = epoch + 1, 0, 0

    def _load(self, entry: dict) -> Batch:
        return _load_shard(self.folder, entry, self.sites, self.dims, self.manifest["dtype"])

    def _chunks(self, tensors: Batch, rows: int, start: int, perm: torch.Tensor | None) -> Iterator[tuple[int, Batch]]:
        for lo in range(start, rows, FILE_READ_ROWS):
            hi = min(lo + FILE_READ_ROWS, rows)
            idx = slice(lo, hi) if perm is None else perm[lo:hi]
            yield hi, {k: v[idx] for k, v in tensors.items()}

    def _raw(self, split: str) -> Iterator[Batch]:
        if split == "eval":
            for entry in self.eval[self.rank::self.world]:
                for _, chunk in self._chunks(self._load(entry), entry["rows"], 0, None):
                    yield chunk
            return
        plan = self._plan()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-prefetch")
        try:
            nxt = next(plan)
            future = pool.submit(self._load, self.train[nxt[2]])
            while True:
                (epoch, j, shard, start), current = nxt, future
                nxt = next(plan)
                future = pool.submit(self._load, self.train[nxt[2]])  # the next shard loads while this one is read
                if epoch != self.position["epoch"]:
                    log.info("activation store: epoch %d over its %d train rows begins", epoch + 1, self.train_rows)
                    self.position = {"epoch": epoch, "index": j, "row": start}
                rows = self.train[shard]["rows"]
                perm = None
                if self.data_cfg.shuffle_rows:  # a permutation per (seed, epoch, shard): the same after a resume
                    g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + shard)
                    perm = torch.randperm(rows, generator=g)
                for hi, chunk in self._chunks(current.result(), rows, start, perm):
                    self.position = {"epoch": epoch, "index": j, "row": hi}  # before the yield: a checkpoint counts it
                    yield chunk
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def build_store_source(cfg: RunConfig, device: torch.device, rank: int, world: int) -> StoreSource:
    """data.source=store: the manifest checked against the config before any training."""
    folder = Path(cfg.data.store_dir)
    manifest = read_manifest(folder)
    check_store_matches(manifest, cfg, folder)
    source = StoreSource(cfg.data, device, cfg.train.seed, manifest, configured_sites(cfg), rank, world)
    if source.train_rows < cfg.train.total_tokens:
        log.warning("train.total_tokens=%d, but the activation store '%s' holds %d train rows: training reads it "
                    "%.1f times (each new epoch is logged)", cfg.train.total_tokens, folder, source.train_rows,
                    cfg.train.total_tokens / source.train_rows)
    return source
