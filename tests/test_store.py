"""The activation store (framework/store.py): `sparsemill cache` writes what the LLM source
streams, resumes after kill -9 and a full disk without a missing or duplicated row, and
data.source=store reads it back (seeded shuffle, exact resume, every bad store refused)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework import durable, placement, store
from framework.config import load_cache_config, load_config
from framework.errors import ConfigError, DataError
from framework.train import train

SITES = ["blocks.0.mlp_in", "blocks.0.mlp_out", "blocks.1.resid_post"]
CPU = torch.device("cpu")


def _cfg(folder: Path, text_dir: Path, **sections) -> Path:
    cfg = {
        "run_dir": str(folder / "run"),
        "model": {"name": "tiny-gpt2"},
        "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 4, "shuffle_files": False,
                 "store_dir": str(folder / "store")},
        "saes": [{"name": "r", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4, "dead_after_tokens": 512},
                 {"name": "t", "site": "blocks.0.mlp_in", "output_site": "blocks.0.mlp_out", "n_latents": 64, "k": 4,
                  "dead_after_tokens": 512}],
        "train": {"total_tokens": 24 * 128, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 300},
        "eval": {"tokens": 256, "splice": False},
        "cache": {"tokens": 3000, "shard_rows": 500},
        "log": {"progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(folder: Path, split: str) -> dict[str, torch.Tensor]:
    """A store split's rows in manifest order, per site (read without the source)."""
    manifest = json.loads((folder / store.MANIFEST).read_text())
    parts = [load_file(str(folder / e["file"])) for e in manifest["splits"][split]]
    return {site: torch.cat([p[site] for p in parts]) for site in manifest["sites"]}


def _stream(source, split: str, n: int) -> dict[str, torch.Tensor]:
    taken = placement.take_tokens(source.batches(split), n)
    return {k: torch.cat([b[k] for b in taken])[:n] for k in taken[0]}


Cached = namedtuple("Cached", "cfg folder summary")


@pytest.fixture(scope="module")
def cached(tmp_path_factory, text_dir) -> Cached:
    """A 3000-row fp32 store (shards of 500 rows) of the three sites, written uninterrupted."""
    root = tmp_path_factory.mktemp("store")
    path = _cfg(root, text_dir)
    summary = store.cache(load_cache_config(path))
    return Cached(path, root / "store", summary)


def _store_cfg(path: Path, folder: Path, *overrides: str):
    return load_config(path, ["data.source=store", f"data.store_dir={folder}", *overrides])


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


# --------------------------------------------------------------------------- writing


def test_store_holds_the_streamed_activations_with_a_verified_manifest(cached):
    manifest = json.loads((cached.folder / store.MANIFEST).read_text())
    assert manifest["sites"] == {s: 64 for s in SITES} and manifest["dtype"] == "float32"
    assert manifest["model"]["name"] == "tiny-gpt2" and manifest["data"]["context_size"] == 32
    assert manifest["rows"]["train"] == 3000 and [e["rows"] for e in manifest["splits"]["train"]] == [500] * 6
    for entry in manifest["splits"]["train"] + manifest["splits"]["eval"]:
        assert durable.hash_file(cached.folder / entry["file"]) == {"size": entry["size"], "sha256": entry["sha256"]}
    assert not list(cached.folder.glob(".tmp-*"))
    llm = placement.build_source(load_config(cached.cfg), CPU)  # the LLM streaming the same config
    n_eval = manifest["rows"]["eval"]
    assert 0 < n_eval <= 256
    for split, n in (("train", 3000), ("eval", n_eval)):
        streamed, kept = _stream(llm, split, n), _rows(cached.folder, split)
        assert all(torch.equal(streamed[s], kept[s]) for s in SITES), split
    src = placement.build_source(_store_cfg(cached.cfg, cached.folder, "data.shuffle_rows=false"), CPU)
    read = _stream(src, "train", 3000)  # read back through the source: the same rows, in order
    assert all(torch.equal(read[s], _rows(cached.folder, "train")[s]) for s in SITES)


def _journal(folder: Path) -> dict:
    return json.loads((folder / store.journal_name(0)).read_text())


@pytest.mark.parametrize("stage", ["written", "renamed"])
def test_kill9_while_caching_resumes_without_missing_or_duplicate_rows(tmp_path, text_dir, cached, stage):
    """The writer SIGKILLs itself at its 4th shard (temporary file written / renamed but not
    journalled): the rerun finishes a store whose rows equal the uninterrupted store's."""
    path = _cfg(tmp_path, text_dir)
    env = {**os.environ, store.KILL_ENV: f"4:{stage}"}
    proc = subprocess.run([sys.executable, "-m", "framework", "cache", str(path), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "store"
    assert not (folder / store.MANIFEST).exists() and len(_journal(folder)["shards"]["train"]) == 2
    with pytest.raises(DataError, match="caching was interrupted"):
        placement.build_source(_store_cfg(path, folder), CPU)
    store.cache(load_cache_config(path))
    assert not list(folder.glob(".tmp-*"))
    for split in store.SPLITS:
        a, b = _rows(folder, split), _rows(cached.folder, split)
        assert all(torch.equal(a[s], b[s]) for s in SITES), split


def test_disk_space_is_checked_first_and_a_full_disk_leaves_no_partial_shard(tmp_path, text_dir, cached, monkeypatch):
    path = _cfg(tmp_path, text_dir)
    folder = tmp_path / "store"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    with pytest.raises(DataError, match="GiB free, the store needs about"):
        store.cache(load_cache_config(path))
    assert not list(folder.glob("*.safetensors"))
    monkeypatch.undo()

    real_write, calls = durable.write_file, []

    def fills_at_third(target: Path, data: bytes) -> None:
        if target.name.startswith(".tmp-"):
            calls.append(target)
            if len(calls) == 3:
                target.write_bytes(data[: len(data) // 2])  # the disk fills halfway through the shard
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(target, data)

    monkeypatch.setattr(durable, "write_file", fills_at_third)
    with pytest.raises(DataError, match="disk is full"):
        store.cache(load_cache_config(path))
    monkeypatch.undo()
    assert not list(folder.glob(".tmp-*")) and not (folder / store.MANIFEST).exists()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [store.shard_name("eval", 0, 0),
                                                                   store.shard_name("train", 0, 0)]
    store.cache(load_cache_config(path))
    a, b = _rows(folder, "train"), _rows(cached.folder, "train")
    assert all(torch.equal(a[s], b[s]) for s in SITES)


def test_every_rank_writes_its_own_shards_in_the_chosen_dtype(tmp_path, text_dir):
    """Two ranks (run one after the other): each caches its share of the documents in bf16;
    the manifest appears when the last one finishes and lists both ranks' shards."""
    path = _cfg(tmp_path, text_dir, cache={"tokens": 1200, "dtype": "bfloat16"})
    cfg = load_cache_config(path)
    first = store.cache(cfg, rank=1, world=2)
    assert first["manifest"] is None and not (tmp_path / "store" / store.MANIFEST).exists()
    assert store.cache(cfg, rank=0, world=2)["manifest"]
    manifest = json.loads((tmp_path / "store" / store.MANIFEST).read_text())
    assert manifest["world"] == 2 and manifest["rows"]["train"] == 1200 and manifest["dtype"] == "bfloat16"
    files = [e["file"] for e in manifest["splits"]["train"]]
    assert {f.split("-")[1] for f in files} == {"r00000", "r00001"}
    for rank in (0, 1):
        llm = placement.build_source(load_config(path), CPU, rank, 2)
        parts = [load_file(str(tmp_path / "store" / f)) for f in files if f"-r{rank:05d}-" in f]
        mine = {s: torch.cat([p[s] for p in parts]) for s in SITES}
        streamed = _stream(llm, "train", 600)
        assert all(mine[s].dtype == torch.bfloat16 and torch.equal(mine[s], streamed[s].bfloat16()) for s in SITES)
    src = placement.build_source(_store_cfg(path, tmp_path / "store"), CPU, 1, 2)  # read back: float32 rows
    assert next(src.batches("train"))["blocks.1.resid_post"].dtype == torch.float32


def test_cache_config_errors(tmp_path, text_dir):
    path = _cfg(tmp_path, text_dir)
    for override, fragment in [("cache.dtype=int8", "cache.dtype"), ("cache.shard_rows=0", "cache.shard_rows"),
                               ("data.store_dir=", "data.store_dir"), ("cache.tokens=-1", "cache.tokens")]:
        with pytest.raises(ConfigError, match=fragment):
            load_cache_config(path, [override])
    with pytest.raises(ConfigError, match="data.store_dir: activation store folder not found"):
        load_config(path, ["data.source=store", f"data.store_dir={tmp_path / 'none'}"])


# --------------------------------------------------------------------------- reading


def _damage_shard(folder: Path, how: str) -> None:
    path = folder / store.shard_name("train", 0, 3)
    data = bytearray(path.read_bytes())
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[:-100])
    else:  # tampered: same size, one value changed
        data[-8] ^= 0xFF
        path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / store.MANIFEST
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            manifest[section][name] = value
        else:
            manifest[section] = value
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("case, error, fragment", [
    ("missing", DataError, "shard .* is missing"),
    ("truncated", DataError, "truncated or damaged"),
    ("tampered", DataError, "does not match the manifest"),
    ("other model", ConfigError, "was cached from 'tiny-llama'"),
    ("other seed", ConfigError, "drawn with seed 0"),
    ("other sites", ConfigError, "saes.1.output_site: 'blocks.0.mlp_out' is not in the activation store"),
    ("dtype", DataError, "holds dtype 'int8'"),
    ("no manifest", DataError, "not an activation store"),
])
def test_bad_stores_are_refused_naming_the_problem(tmp_path, cached, case, error, fragment):
    folder = _copy(cached.folder, tmp_path)
    overrides = []
    if case in ("missing", "truncated", "tampered"):
        _damage_shard(folder, case)
    elif case == "other model":
        _edit_manifest(folder, model__name="tiny-llama")
    elif case == "other seed":
        overrides = ["train.seed=1"]
    elif case == "other sites":
        manifest = json.loads((folder / store.MANIFEST).read_text())
        _edit_manifest(folder, sites={k: v for k, v in manifest["sites"].items() if k != "blocks.0.mlp_out"})
    elif case == "dtype":
        _edit_manifest(folder, dtype="int8")
    else:
        (folder / store.MANIFEST).unlink()
        (folder / store.journal_name(0)).unlink()
    with pytest.raises(error, match=fragment):
        src = placement.build_source(_store_cfg(cached.cfg, folder, *overrides), CPU)
        _stream(src, "train", 3000)  # a tampered shard is found when it is loaded, before its rows are used


def test_shuffle_is_seeded_covers_each_row_once_per_epoch_and_resumes_exactly(cached, caplog, monkeypatch):
    caplog.set_level(logging.INFO, "sparsemill")
    monkeypatch.setattr(store, "FILE_READ_ROWS", 128)  # several reads per shard: a position inside one
    cfg = _store_cfg(cached.cfg, cached.folder, "train.total_tokens=6500")
    src = placement.build_source(cfg, CPU)
    assert "reads it 2.2 times" in caplog.text
    epoch = _stream(src, "train", 3000)["blocks.1.resid_post"]
    kept = _rows(cached.folder, "train")["blocks.1.resid_post"]
    assert not torch.equal(epoch, kept)
    assert torch.equal(epoch[epoch[:, 0].argsort()], kept[kept[:, 0].argsort()])  # a permutation of the rows
    assert torch.equal(_stream(placement.build_source(cfg, CPU), "train", 3000)["blocks.1.resid_post"], epoch)

    straight = placement.build_source(cfg, CPU)
    stream = straight.batches("train")
    head = placement.take_tokens(stream, 1700)  # stops inside a shard
    state = json.loads(json.dumps(straight.stream_state()))
    assert 0 < straight.position["row"] < 500
    tail = torch.cat([next(stream)["blocks.1.resid_post"] for _ in range(30)])  # on into the second epoch
    assert "epoch 2 over its 3000 train rows begins" in caplog.text
    resumed = placement.build_source(cfg, CPU)
    resumed.load_stream_state(state)
    again = resumed.batches("train")
    assert torch.equal(torch.cat([next(again)["blocks.1.resid_post"] for _ in range(30)]), tail)
    assert head and state["position"]["kind"] == "store"


def _final(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_training_from_a_store_resumes_bitwise(tmp_path, cached, monkeypatch):
    """Shuffled store, stopped (the preemption path) at step 7 and resumed: the weights equal
    an uninterrupted run's bit for bit; the checkpoint holds the store position."""
    from framework import train as train_module
    from framework.preemption import Preempted

    def cfg(run: str):
        return _store_cfg(cached.cfg, cached.folder, f"run_dir={tmp_path / run}", "train.total_tokens=4096",
                          "eval.tokens=128")

    summary = train(cfg("straight"))
    assert summary["steps"] == 32 and summary["saes"]["t"]["fvu"] < 1
    calls = iter(range(1, 10**6))
    monkeypatch.setattr(train_module.PreemptionFlag, "should_stop", lambda self, engine: next(calls) == 7)
    with pytest.raises(Preempted):
        train(cfg("stopped"))
    state = json.loads((_final(tmp_path / "stopped") / "rank_00000.json").read_text())
    assert state["source"]["position"]["kind"] == "store"
    monkeypatch.undo()
    train(cfg("stopped"))
    for name in ("r", "t"):
        a = load_file(str(_final(tmp_path / "straight") / f"{name}.safetensors"))
        b = load_file(str(_final(tmp_path / "stopped") / f"{name}.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_checkpoints_from_before_stores_still_resume_but_another_store_is_refused(tmp_path, cached):
    """A checkpoint config without the store keys compares as their defaults; the store folder
    and the row shuffle decide the data order, so changing them blocks a resume."""
    from framework.compatibility import config_differences

    now = load_config(cached.cfg).to_dict()
    old = json.loads(json.dumps(now))
    del old["data"]["store_dir"], old["data"]["shuffle_rows"], old["cache"]
    now["data"]["store_dir"] = ""
    assert config_differences(old, now)[0] == []
    stored = _store_cfg(cached.cfg, cached.folder).to_dict()
    other = _store_cfg(cached.cfg, tmp_path, "data.shuffle_rows=false").to_dict()
    assert sorted(config_differences(stored, other)[0]) == ["data.shuffle_rows: True -> False",
                                                            f"data.store_dir: '{cached.folder}' -> '{tmp_path}'"]


def test_the_store_sweep_example_validates_against_a_store_it_describes(tmp_path, text_dir):
    """slurm/sweeps/debug_k_store.txt: after its `sparsemill cache` line (on test text), every
    task line loads and matches the store (the manifest check training makes first)."""
    root = Path(__file__).resolve().parents[1]
    folder = tmp_path / "stores" / "debug"
    common = [f"data.paths=[{text_dir}]", "log.progress=false"]
    store.cache(load_cache_config(root / "configs" / "debug.yaml",
                                  [f"data.store_dir={folder}", "cache.tokens=2048", "cache.eval_tokens=256", *common]))
    lines = [ln.split() for ln in (root / "slurm" / "sweeps" / "debug_k_store.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 2
    for config, *overrides in lines:
        overrides = [f"data.store_dir={folder}" if o.startswith("data.store_dir=") else o for o in overrides]
        cfg = load_config(root / config, [*overrides, *common])
        assert cfg.data.source == "store" and Path(cfg.data.store_dir) == folder
        store.check_store_matches(store.read_manifest(folder), cfg, folder)  # what training checks first
