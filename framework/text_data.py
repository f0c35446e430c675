"""Text -> packed token sequences, streamed through Hugging Face `datasets`.

Documents are split deterministically into train and held-out eval by a hash of their content
(so the two never overlap, whatever the file order), tokenised without special tokens, joined
with a separator and cut into `context_size` sequences that each start with BOS. A keep-mask
marks the positions an SAE may see: never BOS, EOS, pad or other special tokens.
"""

from __future__ import annotations

import glob
import itertools
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from framework.schema import ConfigError, DataConfig
from framework.errors import DataError

TEXT_SUFFIXES = {".txt": "text", ".rst": "text", ".md": "text", ".text": "text",
                 ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EVAL_PERCENT = 5  # share of documents held out for evaluation


def _expand_one(item: str) -> list[Path]:
    p = Path(item).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in TEXT_SUFFIXES)
    if p.is_file():
        return [p]
    matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
    return [m for m in matches if m.is_file()]


def _suffix(path: Path) -> str:
    """`.rst.txt` (Sphinx sources) counts as text; otherwise the last suffix."""
    return path.suffix.lower()


def resolve_sources(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Local files (expanded, sorted) and hub dataset names. Missing local paths are an error."""
    files, hub = [], []
    for item in paths:
        found = _expand_one(item)
        if found:
            bad = [f for f in found if _suffix(f) not in TEXT_SUFFIXES]
            if bad:
                raise ConfigError(f"data.paths: unsupported file type '{bad[0]}' (supported: {sorted(TEXT_SUFFIXES)})")
            files.extend(found)
        elif "/" in item and not item.startswith((".", "/", "~")) and not any(c in item for c in "*?["):
            hub.append(item)
        else:
            raise ConfigError(f"data.paths: '{item}' matches no file (supported: {sorted(TEXT_SUFFIXES)})")
    return files, hub


def _has_content(doc: str | list[int] | None) -> bool:
    """Whitespace-only text is no document: it would train on blanks and hold nothing out."""
    return bool(doc.strip()) if isinstance(doc, str) else bool(doc)


def is_eval_document(doc: str | list[int]) -> bool:
    key = doc.encode() if isinstance(doc, str) else str(doc[:64]).encode()
    return zlib.crc32(key) % 100 < EVAL_PERCENT


def _field(cfg: DataConfig) -> str:
    return cfg.tokens_field or cfg.text_field


def _file_documents(files: list[Path], cfg: DataConfig) -> Iterator[str | list[int]]:
    """One streaming dataset per run of same-type files, so the seeded file order is kept
    and a plain text file is one document."""
    from datasets import load_dataset  # noqa: PLC0415

    for builder, group in itertools.groupby(files, key=lambda f: TEXT_SUFFIXES[_suffix(f)]):
        group = [str(f) for f in group]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = load_dataset(builder, data_files=group, split="train", streaming=True, **kwargs)
        column = "text" if builder == "text" else _field(cfg)
        try:
            for row in ds:
                if column not in row:
                    raise ConfigError(f"data: files {group[:3]} have no column '{column}' (columns: {sorted(row)})")
                yield row[column]
        except (ConfigError, GeneratorExit):
            raise
        except Exception as err:  # noqa: BLE001  (datasets wraps decoding/parsing errors in its own types)
            raise DataError(f"data.paths: {_unreadable(group, builder)} ({type(err).__name__})") from None


def _unreadable(group: list[str], builder: str) -> str:
    """Which file of a group broke the reader: the first that is not UTF-8 text (or, for
    json/parquet, that the format's own parser rejects)."""
    for name in group:
        try:
            if builder == "parquet":
                import pyarrow.parquet  # noqa: PLC0415

                pyarrow.parquet.ParquetFile(name)
            else:
                text = Path(name).read_text(encoding="utf-8")
                if builder == "json":
                    for line in text.splitlines() if name.endswith(".jsonl") else [text]:
                        if line.strip():
                            json.loads(line)
        except UnicodeDecodeError as err:
            return f"'{name}' is not UTF-8 text (byte {err.start}: {err.reason}); is it a binary file?"
        except Exception as err:  # noqa: BLE001
            return f"'{name}' cannot be read as {builder}: {err}"
    return f"one of {group[:3]}{'...' if len(group) > 3 else ''} cannot be read as {builder}"


def _hub_documents(name: str, cfg: DataConfig, seed: int) -> Iterator[str | list[int]]:
    from datasets import load_dataset  # noqa: PLC0415

    ds = load_dataset(name, split=cfg.split, streaming=True)
    if cfg.shuffle_files:
        ds = ds.shuffle(seed=seed, buffer_size=1000)
    for row in ds:
        yield row[_field(cfg)]


@dataclass
class TextPosition:
    """Where a rank's train stream stands, updated in place as it yields (so a snapshot taken
    while the consumer holds a batch is exactly "everything up to that batch"):
    `epoch` and `index` (the split's next document index; every rank counts the whole split,
    taking every world-th document), the packer's leftover tokens, and counters. Resuming
    skips the documents before `index` without tokenising them and restores the leftover."""

    epoch: int = 0
    index: int = 0
    started: bool = False  # a document was packed: the separator goes before the next one
    sequences: int = 0
    batches: int = 0
    _pending: list = field(default_factory=list, repr=False)  # packer's buffer; live from _offset
    _offset: int = 0

    def leftover(self) -> list[int]:
        return [int(t) for t in self._pending[self._offset:]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "started": self.started, "sequences": self.sequences,
                "batches": self.batches, "leftover": self.leftover()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TextPosition":
        return cls(state["epoch"], state["index"], state["started"], state["sequences"], state["batches"],
                   list(state["leftover"]), 0)


def documents(cfg: DataConfig, split: str, seed: int, rank: int = 0, world: int = 1,
              position: TextPosition | None = None) -> Iterator[str | list[int]]:
    """Documents of one split (this rank's share: every world-th document). The train split
    repeats (reshuffled) forever; eval is one pass. With `position`, the stream starts at its
    epoch and index and keeps it up to date."""
    files, hub = resolve_sources(cfg.paths)
    want_eval = split == "eval"
    epoch, start = (position.epoch, position.index) if position is not None else (0, 0)
    while True:
        order = list(files)
        if cfg.shuffle_files:
            random.Random(seed + epoch).shuffle(order)
        streams = [_file_documents(order, cfg)] + [_hub_documents(h, cfg, seed + epoch) for h in hub]
        any_doc = False
        index = 0
        for stream in streams:
            for doc in stream:
                if _has_content(doc) and is_eval_document(doc) == want_eval:
                    any_doc = True
                    if index % world == rank and index >= start:
                        if position is not None:
                            position.epoch, position.index = epoch, index + 1
                        yield doc
                    index += 1
        if want_eval:
            return
        if not any_doc:
            raise ConfigError(f"data.paths: no training documents found in {cfg.paths}")
        epoch, start = epoch + 1, 0


def special_token_ids(tokenizer) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.add(value)
    return sorted(ids)


def _separator_id(tokenizer, cfg: DataConfig) -> int | None:
    if cfg.separator == "none":
        return None
    value = tokenizer.eos_token_id if cfg.separator == "eos" else tokenizer.bos_token_id
    if value is None:
        raise ConfigError(f"data.separator: tokenizer has no {cfg.separator} token; use separator: none")
    return value


def pack(docs: Iterator[str | list[int]], tokenizer, cfg: DataConfig,
         position: TextPosition | None = None) -> Iterator[torch.Tensor]:
    """Token sequences of exactly context_size: [BOS] + tokens of documents joined by the
    separator; a document longer than a sequence continues in the next one. With `position`,
    packing starts from its leftover tokens and keeps them up to date."""
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None
    if cfg.prepend_bos and bos is None:
        raise ConfigError("data.prepend_bos: tokenizer has no BOS token; set data.prepend_bos=false")
    sep = _separator_id(tokenizer, cfg)
    body = cfg.context_size - (1 if bos is not None else 0)
    position = position if position is not None else TextPosition()
    pending, offset, started = position.leftover(), 0, position.started
    head = [bos] if bos is not None else []
    docs = iter(docs)
    while True:
        while len(pending) - offset >= body:
            chunk = pending[offset:offset + body]
            offset += body
            position._pending, position._offset, position.sequences = pending, offset, position.sequences + 1
            yield torch.tensor(head + chunk, dtype=torch.long)
        doc = next(docs, None)
        if doc is None:
            return
        ids = list(doc) if not isinstance(doc, str) else tokenizer(doc, add_special_tokens=False)["input_ids"]
        pending = pending[offset:]  # a new list: a snapshot held by `position` stays intact
        offset = 0
        if started and sep is not None:
            pending.append(sep)
        pending.extend(ids)
        started = position.started = True
        position._pending, position._offset = pending, offset


def keep_mask(ids: torch.Tensor, specials: list[int], exclude_special: bool) -> torch.Tensor:
    """Positions an SAE may see. Position 0 (BOS, or an attention sink) is always excluded."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    if exclude_special and specials:
        keep &= ~torch.isin(ids, torch.tensor(specials, device=ids.device))
    keep[..., 0] = False
    return keep


def sequence_batches(cfg: DataConfig, tokenizer, split: str, seed: int, rank: int = 0,
                     world: int = 1, position: TextPosition | None = None) -> Iterator[torch.Tensor]:
    """[llm_batch_size, context_size] token batches (the last eval batch may be smaller).
    With `position` (train), the stream continues from it and keeps it up to date: at each
    yield it describes exactly the batches yielded so far."""
    seqs = pack(documents(cfg, split, seed, rank, world, position), tokenizer, cfg, position)
    batch = []
    for seq in seqs:
        batch.append(seq)
        if len(batch) == cfg.llm_batch_size:
            if position is not None:
                position.batches += 1
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
