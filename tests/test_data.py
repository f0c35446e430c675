"""Packing/BOS rules, the train/eval split, activation files and the mixing buffer."""

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framework import text_data
from framework.activations import FileSource
from framework.buffer import MixingBuffer
from framework.config import ConfigError, DataConfig
from framework.llm import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_packing_bos_separator_and_keep_mask(tok):
    cfg = DataConfig(context_size=8, prepend_bos=True, separator="eos")
    docs = ["abcdefghij", "xyz", "0123456789"]
    seqs = list(text_data.pack(iter(docs), tok, cfg))
    flat = []
    for s in seqs:
        assert s.shape == (8,) and s[0] == tok.bos_token_id
        flat += s[1:].tolist()
    expected = tok("abcdefghij")["input_ids"] + [tok.eos_token_id] + tok("xyz")["input_ids"] + [tok.eos_token_id] \
        + tok("0123456789")["input_ids"]
    assert flat == expected[: len(flat)] and len(flat) == 7 * (len(expected) // 7)
    keep = text_data.keep_mask(torch.stack(seqs), text_data.special_token_ids(tok), True)
    ids = torch.stack(seqs)
    assert not keep[:, 0].any()
    assert not keep[ids == tok.eos_token_id].any() and not keep[ids == tok.bos_token_id].any()
    assert keep[:, 1:][ids[:, 1:] < 256].all()  # every ordinary token after position 0 is kept


def test_packing_without_bos_or_separator(tok):
    cfg = DataConfig(context_size=5, prepend_bos=False, separator="none")
    seqs = list(text_data.pack(iter(["abc", "defgh", "ij"]), tok, cfg))
    assert [tok.decode(s) for s in seqs] == ["abcde", "fghij"]


def test_train_and_eval_documents_are_disjoint(text_dir):
    cfg = DataConfig(paths=[str(text_dir)])
    eval_docs = list(text_data.documents(cfg, "eval", seed=0))
    train_docs = list(itertools.islice(text_data.documents(cfg, "train", seed=0), 500))
    assert eval_docs and train_docs
    assert not set(eval_docs) & set(train_docs)
    everything = [f.read_text() for f in text_dir.iterdir()]
    assert len(set(everything)) == len(everything)
    assert set(train_docs) | set(eval_docs) == set(everything)  # the train split loops over every other doc


def test_jsonl_text_and_pretokenised(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"body": "hello world"}\n{"body": "second doc"}\n')
    cfg = DataConfig(paths=[str(tmp_path / "a.jsonl")], text_field="body")
    docs = list(itertools.islice(text_data.documents(cfg, "train", 0), 2)) + list(text_data.documents(cfg, "eval", 0))
    assert sorted(set(docs)) == ["hello world", "second doc"]
    (tmp_path / "b.jsonl").write_text('{"ids": [1, 2, 3, 4, 5, 6, 7]}\n')
    cfg = DataConfig(paths=[str(tmp_path / "b.jsonl")], tokens_field="ids", context_size=4, separator="none")
    seqs = list(text_data.pack(iter([[1, 2, 3, 4, 5, 6, 7]]), tok, cfg))
    assert [s.tolist() for s in seqs] == [[256, 1, 2, 3], [256, 4, 5, 6]]


def test_mixing_buffer_shuffles_and_keeps_rows_aligned():
    n, d = 4000, 3
    rows = torch.arange(n, dtype=torch.float32)
    stream = ({"a": rows[i:i + 100, None].expand(-1, d), "b": -rows[i:i + 100, None]} for i in range(0, n, 100))
    buf = MixingBuffer(capacity=1000, batch_size=64, seed=0, device=torch.device("cpu"))
    out = list(buf.batches(stream))
    a = torch.cat([b["a"][:, 0] for b in out])
    b = torch.cat([b["b"][:, 0] for b in out])
    assert all(x["a"].shape == (64, d) for x in out)
    assert torch.equal(a, -b)  # sites stay aligned row by row
    assert len(a) == n - n % 64 and len(set(a.tolist())) == len(a)  # nothing duplicated, only the tail dropped
    first = a[:500]
    assert first.std() > 200 and (first.diff() == 1).float().mean() < 0.05  # not in stream order


def test_mixing_buffer_stays_bounded_when_items_exceed_a_refill():
    """Items of 4096 rows into a 512-row buffer (activation files read in chunks): the buffer
    pulls only when it is not full, so what it holds stays below capacity + one item, and
    every row still comes out once."""
    n, item = 40960, 4096
    stream = ({"a": torch.arange(i, i + item, dtype=torch.float32)[:, None]} for i in range(0, n, item))
    buf = MixingBuffer(capacity=512, batch_size=64, seed=0, device=torch.device("cpu"))
    held, out = [], []
    for batch in buf.batches(stream):
        out.append(batch["a"][:, 0])
        held.append(buf.rows)
    assert max(held) < 512 + item
    got = torch.cat(out)
    assert len(got) == n and len(set(got.tolist())) == n


def _write_shards(folder, widths, rows=(50, 70)):
    for i, r in enumerate(rows):
        save_file({k: torch.randn(r, w) for k, w in widths.items()}, str(folder / f"s{i}.safetensors"))


def test_file_source_reads_shards_and_holds_out_eval(tmp_path):
    _write_shards(tmp_path, {"in": 4, "out": 6})
    src = FileSource(DataConfig(source="activations", activations_dir=str(tmp_path)), torch.device("cpu"), 0, eval_rows=30)
    assert src.dims == {"in": 4, "out": 6}
    eval_rows = sum(b["in"].shape[0] for b in src.batches("eval"))
    train_rows = sum(b["in"].shape[0] for b in itertools.islice(src.batches("train"), 2))
    assert eval_rows == 30 and train_rows == 90


def test_npy_shards_and_nonfinite_rows_are_skipped(tmp_path):
    x = np.random.randn(40, 5).astype(np.float32)
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    np.save(tmp_path / "a.npy", x)
    src = FileSource(DataConfig(source="activations", activations_dir=str(tmp_path)), torch.device("cpu"), 0, eval_rows=5)
    (batch,) = itertools.islice(src.batches("train"), 1)
    assert batch["activations"].shape == (33, 5) and src.skipped["train"]["nonfinite"] == 2
    assert torch.isfinite(batch["activations"]).all()


@pytest.mark.parametrize("case,fragment", [
    ("ragged", "ragged"), ("width", "widths"), ("rank", r"expected \[N, d\]"), ("empty", "no .safetensors or .npy"),
])
def test_bad_activation_shards(tmp_path, case, fragment):
    if case == "ragged":
        save_file({"a": torch.zeros(5, 4), "b": torch.zeros(6, 4)}, str(tmp_path / "x.safetensors"))
    elif case == "width":
        _write_shards(tmp_path, {"a": 4}, rows=(5,))
        save_file({"a": torch.zeros(5, 3)}, str(tmp_path / "y.safetensors"))
    elif case == "rank":
        np.save(tmp_path / "x.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ConfigError, match=fragment):
        FileSource(DataConfig(source="activations", activations_dir=str(tmp_path)), torch.device("cpu"), 0, eval_rows=1)
