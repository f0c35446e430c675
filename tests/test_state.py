"""The state manager: exact resume after kill -9 (1 process, and 2-process ddp through torchrun),
atomic saves, corruption fallback, disk full, export and inspect, resumable data streams, and
ZeRO/ddp checkpoints resumed under other strategies and world sizes (pickle-free files)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework import checkpoint, durable, export, text_data
from framework.activations import FileSource, merge_positions
from framework.buffer import MixingBuffer
from framework.checkpoint import InvalidCheckpoint, verify
from framework.compatibility import FORMAT, compatibility
from framework.errors import CheckpointError
from framework.cli import main
from framework.config import DataConfig, load_config
from framework.export import load_exported
from framework.runners import saved_optimizer
from framework.llm import byte_tokenizer
from framework.train import train

STEP_BATCH = 256


# --------------------------------------------------------------------------- helpers


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill9(proc: subprocess.Popen) -> None:
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _saves(root: Path, since: float = 0.0) -> tuple[set[str], set[str]]:
    """(published, in-progress) checkpoint folder names; in-progress ones only if (re)created
    after `since` (a killed save leaves its temporary folder until the next save)."""
    if not root.is_dir():
        return set(), set()
    published, pending = set(), set()
    for p in root.iterdir():
        try:
            if p.name.startswith("step_"):
                published.add(p.name)
            elif p.name.startswith(".tmp_step_") and p.stat().st_mtime >= since:
                pending.add(p.name)
        except FileNotFoundError:  # renamed while we looked
            pass
    return published, pending


def _same_weights(a: Path, b: Path, names) -> None:
    for name in names:
        x, y = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert set(x) == set(y)
        for key in x:
            if not torch.equal(x[key], y[key]):
                off = x[key] != y[key]
                raise AssertionError(f"{name}:{key} differs in {int(off.sum())} of {off.numel()} elements, by up to "
                                     f"{float((x[key] - y[key]).abs().max()):.3g}")


def _final(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _all_published_valid(root: Path) -> None:
    for path in checkpoint.list_checkpoints(root):
        verify(path)


# --------------------------------------------------------------------------- fixtures


def _write_shards(folder: Path, n_shards: int, rows: int) -> Path:
    """Sparse codes over a fixed 48 x 16 dictionary, as .npy activation shards."""
    g = np.random.default_rng(0)
    dictionary = g.standard_normal((48, 16)).astype(np.float32)
    for i in range(n_shards):
        codes = (g.random((rows, 48)) < 0.06) * g.exponential(1.0, (rows, 48))
        np.save(folder / f"shard{i}.npy", (codes @ dictionary).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _write_shards(tmp_path_factory.mktemp("acts"), 3, 5000)


def _files_cfg(folder: Path, shards: Path, steps: int = 24, **train) -> Path:
    cfg = {
        "run_dir": str(folder / "run"),
        "data": {"source": "activations", "activations_dir": str(shards)},
        "saes": [{"name": "s", "n_latents": 64, "k": 4, "dead_after_tokens": 1024},
                 {"name": "abs", "n_latents": 32, "k": 3, "kind": "abstopk"}],
        "train": {"total_tokens": steps * STEP_BATCH, "batch_size": STEP_BATCH, "buffer_tokens": 1024,
                  "init_tokens": 600, "warmup_steps": 2, "checkpoint_every": 2, "keep_checkpoints": 3, **train},
        "eval": {"tokens": 1000, "every_steps": 8},
        "log": {"progress": False, "every_steps": 3, "histogram_every": 5, "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """An uninterrupted 24-step run on activation files (checkpoints at 20, 22, 24)."""
    folder = tmp_path_factory.mktemp("reference")
    summary = train(load_config(_files_cfg(folder, shards)))
    assert summary["steps"] == 24
    return folder / "run"


def _copy_run(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the reference run whose config points at the copy."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cfg = yaml.safe_load((reference / "config.yaml").read_text())
    cfg["run_dir"] = str(run)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run, path


# --------------------------------------------------------------------------- units


def test_mixing_buffer_resumes_from_any_batch():
    g = torch.Generator().manual_seed(0)
    items = [{"a": torch.randn(int(n), 3, generator=g), "b": torch.randn(int(n), 2, generator=g)}
             for n in torch.randint(20, 90, (40,), generator=g)]

    def make():
        return MixingBuffer(capacity=200, batch_size=32, seed=5, device=torch.device("cpu"))

    def counted(rest, taken):
        for item in rest:
            taken[0] += 1
            yield item

    full = make()
    full.push(items[:3])
    expected = list(full.batches(iter(items[3:])))
    for cut in (1, 4, 9, 17):
        buf = make()
        buf.push(items[:3])
        taken = [0]
        gen = buf.batches(counted(items[3:], taken))
        got = [next(gen) for _ in range(cut)]
        state = {k: v.clone() for k, v in buf.tensors().items()}
        fresh = make()
        fresh.load_tensors(state)
        got += list(fresh.batches(iter(items[3 + taken[0]:])))
        assert len(got) == len(expected)
        for x, y in zip(got, expected):
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_text_position_continues_the_stream_exactly(text_dir):
    tok = byte_tokenizer()
    cfg = DataConfig(paths=[str(text_dir)], context_size=24, llm_batch_size=3)
    for rank, world in ((0, 1), (1, 2)):
        expected = list(itertools.islice(text_data.sequence_batches(cfg, tok, "train", 0, rank, world), 60))
        pos = text_data.TextPosition()
        head = list(itertools.islice(text_data.sequence_batches(cfg, tok, "train", 0, rank, world, pos), 23))
        saved = json.loads(json.dumps(pos.state_dict()))  # as stored in a checkpoint
        assert saved["batches"] == 23 and saved["leftover"]  # mid-document: leftover tokens carried over
        resumed = text_data.TextPosition.from_state_dict(saved)
        tail = list(itertools.islice(text_data.sequence_batches(cfg, tok, "train", 0, rank, world, resumed), 37))
        assert all(torch.equal(a, b) for a, b in zip(head + tail, expected))


def test_file_position_resumes_across_epochs_and_merges_for_other_world_sizes(tmp_path):
    g = np.random.default_rng(1)
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", g.standard_normal((5000, 4)).astype(np.float32))
    data = DataConfig(source="activations", activations_dir=str(tmp_path))

    def source(rank=0, world=1):
        return FileSource(data, torch.device("cpu"), 0, eval_rows=100, rank=rank, world=world)

    src = source()
    expected = [b["activations"] for b in itertools.islice(src.batches("train"), 14)]  # > 2 epochs of 4 chunks
    first = source()
    head = [b["activations"] for b in itertools.islice(first.batches("train"), 6)]
    state = json.loads(json.dumps(first.stream_state()))
    second = source()
    second.load_stream_state(state)
    tail = [b["activations"] for b in itertools.islice(second.batches("train"), 8)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, expected))

    # two ranks at different depths -> one rank continues from the furthest, repeating nothing
    ranks = [source(r, 2) for r in range(2)]
    seen = [[b["activations"][0, 0].item() for b in itertools.islice(s.batches("train"), n)]
            for s, n in zip(ranks, (1, 2))]
    merged = source()
    merged.load_position(merge_positions([s.stream_state()["position"] for s in ranks]))
    after = [b["activations"][0, 0].item() for b in itertools.islice(merged.batches("train"), 2)]
    assert not set(after) & set(seen[0] + seen[1])


def test_world_size_and_strategy_transitions():
    manifest = {"format": FORMAT, "world_size": 2, "strategy": "ddp", "sae_placement": "replicated"}
    assert compatibility(manifest, 2, "ddp", "replicated") == "exact"
    assert compatibility(manifest, 1, "ddp", "replicated") == "elastic"
    assert compatibility(manifest, 4, "ddp", "layer") == "elastic"
    assert compatibility(manifest, 2, "zero2", "replicated") == "elastic"
    zero = {**manifest, "strategy": "zero2"}
    assert compatibility(zero, 2, "zero2", "replicated") == "exact"
    assert compatibility(zero, 1, "zero2", "replicated") == "elastic"
    assert compatibility(zero, 4, "zero3", "replicated") == "elastic"
    assert compatibility(zero, 2, "ddp", "layer") == "elastic"
    with pytest.raises(CheckpointError, match=r"zero2/replicated on 2 rank\(s\) cannot resume as zero3/layer on 2 "
                                              r"rank\(s\): ZeRO does not combine with dist.sae_placement=layer"):
        compatibility(zero, 2, "zero3", "layer")
    # formats 2 and 3 kept optimizer state in pickles (DeepSpeed's; torch.save for ddp) or in an
    # older layout: refused unopened
    with pytest.raises(CheckpointError, match="format 2, zero2.*DeepSpeed checkpoint is a pickle.*--no-resume"):
        compatibility({**zero, "format": 2}, 2, "zero2", "replicated")
    for fmt in (2, 3):
        with pytest.raises(CheckpointError, match=rf"format {fmt}, ddp.*optim.pt\) is a pickle, which this version never"):
            compatibility({**manifest, "format": fmt}, 1, "ddp", "replicated")
    with pytest.raises(CheckpointError, match="format 3, zero2.*this version reads format"):
        compatibility({**zero, "format": 3}, 2, "ddp", "replicated")
    with pytest.raises(CheckpointError, match=f"this version reads format {FORMAT}"):
        compatibility({**manifest, "format": FORMAT + 1}, 2, "ddp", "replicated")


class _Planted:
    """A pickle that, if ever unpickled, creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_old_format_and_planted_pickles_are_refused_unopened(tmp_path, reference, caplog):
    run, path = _copy_run(reference, tmp_path)
    folder = run / "checkpoints" / "step_00000024"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 2, "strategy": "zero2"}))
    with pytest.raises(CheckpointError, match="cannot resume: its DeepSpeed checkpoint is a pickle"):
        train(load_config(path))
    # a format-3 ddp checkpoint's optimizer file was a torch.save archive: a planted one is never opened
    marker = tmp_path / "unpickled"
    import pickle

    (folder / "s.optim.pt").write_bytes(pickle.dumps(_Planted(marker)))
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(CheckpointError) as err:
        train(load_config(path))
    assert "optim.pt) is a pickle, which this version never opens" in str(err.value)
    assert "weights_only" not in str(err.value) and not marker.exists()
    # in today's format an extra file is no part of the checkpoint: ignored, never read
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert train(load_config(path))["steps"] == 24 and "resuming from" in caplog.text and not marker.exists()


# --------------------------------------------------------------------------- single-process runs


def _straight_and_stopped(tmp_path, monkeypatch, stop_step: int, cfg) -> None:
    """Runs `cfg(run_dir)` uninterrupted into tmp/straight, and into tmp/stopped stopped at
    `stop_step` by the preemption path, then resumed to the end."""
    from framework import train as train_module
    from framework.preemption import Preempted

    train(cfg(tmp_path / "straight"))
    calls = iter(range(1, 10**6))
    monkeypatch.setattr(train_module.PreemptionFlag, "should_stop", lambda self, engine: next(calls) == stop_step)
    with pytest.raises(Preempted):
        train(cfg(tmp_path / "stopped"))
    monkeypatch.undo()
    train(cfg(tmp_path / "stopped"))


def test_in_process_stops_resume_bitwise_on_text(tmp_path, text_dir, monkeypatch):
    """Text source: stop (the preemption path) at step 7 and resume: equal to the straight run."""
    path = _text_cfg(tmp_path, text_dir)
    _straight_and_stopped(tmp_path, monkeypatch, 7, lambda run: load_config(
        path, [f"run_dir={run}", "train.total_tokens=2048", "train.checkpoint_every=0"]))
    _same_weights(_final(tmp_path / "straight"), _final(tmp_path / "stopped"), ["r"])
    state = json.loads((_final(tmp_path / "stopped") / "rank_00000.json").read_text())
    assert state["source"]["position"]["kind"] == "text" and state["source"]["position"]["batches"] > 0


def _one_site_kinds(kinds) -> list[str]:
    """Kinds trained on one configured site (cross-layer kinds derive stacked sites: tests/test_clt.py)."""
    return sorted(k for k in kinds if not kinds[k].cross_layer)


def test_every_kind_resumes_bitwise(tmp_path, text_dir, monkeypatch):
    """Every registered kind, one SAE each on one LLM stream: stopped at step 5 and resumed,
    the weights, buffers (running thresholds, width hints, densities) and optimizer state
    equal an uninterrupted run's bit for bit."""
    from framework.kinds import SAE_KINDS

    saes = [{"name": kind, "kind": kind, "site": "blocks.1.resid_post", "n_latents": 64, "k": 4,
             "dead_after_tokens": 256, "lr": 1e-3} for kind in _one_site_kinds(SAE_KINDS)]
    path = _text_cfg(tmp_path, text_dir)
    _straight_and_stopped(tmp_path, monkeypatch, 5, lambda run: load_config(
        path, [f"run_dir={run}", "train.total_tokens=1280", "train.checkpoint_every=0", f"saes={json.dumps(saes)}"]))
    _same_weights(_final(tmp_path / "straight"), _final(tmp_path / "stopped"), _one_site_kinds(SAE_KINDS))
    for kind in _one_site_kinds(SAE_KINDS):
        a, b = (saved_optimizer(checkpoint.read_saved(_final(tmp_path / run), kind)).whole()
                for run in ("straight", "stopped"))
        assert all(torch.equal(a[p][k], b[p][k]) for p in a for k in a[p]), kind


@pytest.mark.slow
def test_kill9_at_random_moments_resumes_bitwise(tmp_path, shards):
    """kill -9 five times (two of them while a checkpoint is being written), then finish: the
    weights equal the uninterrupted run's bit for bit, and every published checkpoint verifies.
    The mid-save kills do not depend on timing: those runs write each file 1 s slowly, and the
    kill follows the moment their save folder appears. The uninterrupted run is a fresh process
    too, as a user's is: the test process's thread settings are not the command's."""
    def command(folder: Path) -> list[str]:
        return [sys.executable, "-m", "framework", "train", str(_files_cfg(folder, shards)), "--quiet"]

    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    root = tmp_path / "run" / "checkpoints"
    cmd = command(tmp_path)
    rng = random.Random(7)
    report = []
    for trial in range(5):
        in_save = trial in (1, 3)
        env = {**os.environ, checkpoint.SAVE_DELAY_ENV: "1.0" if in_save else "0.08"}
        before, _ = _saves(root)
        since = time.time() - 0.01
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        if in_save:  # killed once its first save has started writing (each file then takes 1 s)
            while time.time() < deadline and proc.poll() is None and not _saves(root, since)[1]:
                time.sleep(0.01)
        else:  # progress first: this run publishes a checkpoint, then dies at a random moment
            while time.time() < deadline and proc.poll() is None and not _saves(root)[0] - before:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.8))
        mid_save = bool(_saves(root, since)[1])
        _kill9(proc)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
        assert mid_save or not in_save, f"trial {trial}: no save had started when the run was killed"
        report.append((trial, mid_save, checkpoint.latest_name(root)))
        _all_published_valid(root)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "continues where it stopped" in done.stderr
    assert "intra-op threads" not in done.stderr, done.stderr[-3000:]
    _same_weights(_final(tmp_path / "straight" / "run"), _final(tmp_path / "run"), ["s", "abs"])
    print("kill -9 trials (trial, mid-save, latest at kill):", report)


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "manifest"])
def test_corrupted_latest_falls_back_and_still_ends_bitwise(tmp_path, reference, damage, caplog):
    run, path = _copy_run(reference, tmp_path)
    latest = run / "checkpoints" / "step_00000024"
    victim = latest / "s.safetensors"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
        problem = "s.safetensors is truncated"
    elif damage == "delete":
        victim.unlink()
        problem = "s.safetensors is missing"
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0x40
        victim.write_bytes(bytes(data))
        problem = "s.safetensors fails its sha256 check"
    else:
        (latest / "manifest.json").unlink()
        problem = "no manifest.json"
    with pytest.raises(InvalidCheckpoint, match=problem):
        verify(latest)
    assert f"INVALID: step_00000024: " in export.format_inspection(run, export.inspect_run(run))
    train(load_config(path))
    assert "falling back to an older one" in caplog.text and problem in caplog.text
    assert "resuming from" in caplog.text and "step_00000022" in caplog.text
    _same_weights(_final(reference), latest, ["s", "abs"])  # step 24 re-done from 22: identical
    verify(latest)


def test_disk_full_keeps_the_previous_checkpoint_and_stops(tmp_path, shards, reference, monkeypatch, capsys):
    path = _files_cfg(tmp_path, shards)
    real_write = durable.write_file
    count = {"n": 0}

    def full_disk(target: Path, data: bytes) -> None:
        if target.parent.name == ".tmp_step_00000006" and target.name == "s.safetensors":
            real_write(target, data[: len(data) // 2])  # a partial file, then the error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        count["n"] += 1
        real_write(target, data)

    monkeypatch.setattr(durable, "write_file", full_disk)
    assert main(["train", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint error: could not write checkpoint step_00000006" in err
    assert "No space left on device" in err and "previous checkpoint step_00000004 is intact" in err
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint.latest_name(root) == "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    _all_published_valid(root)

    monkeypatch.setattr(durable, "write_file", real_write)  # space freed: the rerun resumes
    assert main(["train", str(path), "--quiet"]) == 0
    _same_weights(_final(reference), _final(tmp_path / "run"), ["s", "abs"])


@pytest.mark.slow
def test_a_bug_during_one_ranks_save_fails_every_rank_without_a_hang(tmp_path, text_dir):
    path = _text_cfg(tmp_path, text_dir)
    worker = Path(__file__).parent / "workers" / "save_failure_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(path), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        caught = (tmp_path / f"rank{rank}.txt").read_text()
        assert caught.startswith("CheckpointError: could not write checkpoint step_00000003"), caught
        assert "rank 1: TypeError: planted bug" in caught and "nothing was published" in caught
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_config_changes_that_break_the_state_are_refused(tmp_path, reference, caplog):
    run, path = _copy_run(reference, tmp_path)
    with pytest.raises(CheckpointError, match=r"different configuration \(train.batch_size: 256 -> 128\)"):
        train(load_config(path, ["train.batch_size=128"]))
    # a longer budget is fine: it resumes (with a warning) and continues
    summary = train(load_config(path, [f"train.total_tokens={26 * STEP_BATCH}"]))
    assert summary["steps"] == 26 and "train.total_tokens: 6144 -> 6656" in caplog.text


def test_resume_at_another_thread_count_says_it_is_not_bitwise(tmp_path, reference, caplog):
    run, path = _copy_run(reference, tmp_path)
    manifest_path = _final(run) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["intra_op_threads"] == torch.get_num_threads()
    train(load_config(path))
    assert "intra-op threads" not in caplog.text
    manifest_path.write_text(json.dumps({**manifest, "intra_op_threads": torch.get_num_threads() + 3}))
    assert train(load_config(path))["steps"] == 24
    assert (f"written with {torch.get_num_threads() + 3} intra-op threads and this process has "
            f"{torch.get_num_threads()}" in caplog.text)


def test_no_resume_moves_old_checkpoints_aside(tmp_path, reference):
    run, path = _copy_run(reference, tmp_path)
    summary = train(load_config(path, ["train.resume=false", f"train.total_tokens={4 * STEP_BATCH}"]))
    assert summary["steps"] == 4
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000004"]
    (aside,) = run.glob("checkpoints.previous-*")
    assert len(checkpoint.list_checkpoints(aside)) == 3


def test_wall_clock_checkpoints(tmp_path, shards):
    path = _files_cfg(tmp_path, shards, steps=4, checkpoint_every=0, checkpoint_minutes=1e-9)
    train(load_config(path, ["eval.every_steps=0"]))
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step_00000002", "step_00000003", "step_00000004"]  # one per step, the newest 3 kept


def test_export_of_a_checkpoint_equals_the_live_export(tmp_path, reference, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(reference), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    x = torch.from_numpy(np.load(sorted(Path(yaml.safe_load((reference / "config.yaml").read_text())
                                              ["data"]["activations_dir"]).glob("*.npy"))[0])[:300])
    for name in ("s", "abs"):
        live, ckpt = load_exported(reference / "export" / name), load_exported(out / name)
        assert torch.equal(ckpt.reconstruct(x), live.reconstruct(x))
        cfg = json.loads((out / name / "cfg.json").read_text())
        assert cfg["metadata"]["training_tokens"] == 24 * STEP_BATCH
    assert main(["export", str(reference), "--checkpoint", "step_00000022", "--out", str(tmp_path / "e22")]) == 0
    assert main(["export", str(reference), "--checkpoint", "step_00000099"]) == 1
    assert "no checkpoint 'step_00000099'" in capsys.readouterr().err


def test_schedule_free_saves_do_not_perturb_training_and_export_eval_weights(tmp_path, shards):
    runs = {}
    for every in (0, 1):
        folder = tmp_path / f"every{every}"
        train(load_config(_files_cfg(folder, shards, steps=6, optimizer="signsgd_schedulefree",
                                     checkpoint_every=every), ["eval.every_steps=0"]))
        runs[every] = folder / "run"
    _same_weights(_final(runs[0]), _final(runs[1]), ["s", "abs"])
    tensors = load_file(str(_final(runs[1]) / "s.safetensors"))
    assert any(k.startswith("eval.") for k in tensors)
    assert not torch.equal(tensors["eval.encoder_weight"], tensors["sae.encoder_weight"])
    export.export_checkpoint(runs[1], out=tmp_path / "out")
    x = torch.randn(200, 16)
    for name in ("s", "abs"):
        live, ckpt = load_exported(runs[1] / "export" / name), load_exported(tmp_path / "out" / name)
        assert torch.equal(ckpt.reconstruct(x), live.reconstruct(x))


def test_inspect_lists_checkpoints_validity_and_metrics(tmp_path, reference, capsys):
    assert main(["inspect", str(reference)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  step_")]
    assert [line.split()[0] for line in lines] == ["step_00000020", "step_00000022", "step_00000024"]
    assert all("valid" in line and "ddp/replicated x1" in line for line in lines)
    assert lines[-1].endswith("<- latest") and "tokens 6,144" in lines[-1]
    assert "eval at step 16: s: fvu=" in out and "final eval: abs: fvu=" in out
    run, _ = _copy_run(reference, tmp_path)
    (run / "checkpoints" / "step_00000022" / "rank_00000.json").write_text("{}")
    assert main(["inspect", str(run), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert not rows["step_00000022"]["valid"] and "rank_00000.json is truncated" in rows["step_00000022"]["problem"]
    assert rows["step_00000024"]["valid"] and rows["step_00000024"]["latest"]


# --------------------------------------------------------------------------- two processes


def _text_cfg(folder: Path, text_dir: Path) -> Path:
    cfg = {
        "run_dir": str(folder / "run"),
        "model": {"name": "tiny-gpt2"},
        "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 4},
        "saes": [{"name": "r", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4, "dead_after_tokens": 512}],
        "train": {"total_tokens": 24 * 128, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 300,
                  "checkpoint_every": 3},
        "eval": {"tokens": 128, "splice": False},
        "log": {"progress": False, "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(path: Path, nproc: int = 2, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "framework", "train", str(path), "--quiet"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_process_ddp_kill9_resumes_bitwise_and_elastically_on_one(tmp_path, text_dir):
    ref_path, run_path = _text_cfg(tmp_path / "ref", text_dir), _text_cfg(tmp_path / "killed", text_dir)
    ref = _torchrun(ref_path)
    env = {**os.environ, checkpoint.SAVE_DELAY_ENV: "0.1"}
    killed = _torchrun(run_path, env=env)
    root = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None and not _saves(root)[0]:
        time.sleep(0.05)
    time.sleep(random.Random(3).uniform(0.0, 1.0))
    mid_save = bool(_saves(root)[1])
    assert checkpoint.latest_name(root) is not None
    _kill9(killed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()[-3000:]
    _all_published_valid(root)
    elastic_run, elastic_path = _copy_run(tmp_path / "killed" / "run", tmp_path / "elastic")

    resumed = _torchrun(run_path)
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err and "continues where it stopped" in err
    _, ref_err = ref.communicate(timeout=400)
    assert ref.returncode == 0, ref_err[-3000:]
    _same_weights(_final(tmp_path / "ref" / "run"), _final(tmp_path / "killed" / "run"), ["r"])
    manifest = json.loads((_final(tmp_path / "killed" / "run") / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"rank_00000.json", "rank_00001.safetensors"} <= set(manifest["files"])
    print(f"2-process kill -9 (mid-save: {mid_save}) resumed bitwise")

    # the 2-rank checkpoint continues on one process (elastic: exact weights/optimizer, data approximate)
    summary = train(load_config(elastic_path))
    assert summary["steps"] == 24 and summary["world_size"] == 1
    assert 0 < summary["saes"]["r"]["fvu"] < 1.5


# --------------------------------------------------------------------------- ZeRO state, other layouts

STATE_WORKER = Path(__file__).parent / "workers" / "zero_state_worker.py"
LAYOUT_STEPS = 10
# run: (strategy, ranks, resumed from (run, step) or None). Every run trains to step 10 and saves
# every 2 steps; chained, so that few processes cover every transition.
LAYOUT_RUNS = {
    "zero2x2": ("zero2", 2, None),
    "zero2x2-again": ("zero2", 2, ("zero2x2", 4)),  # exact
    "zero2x1": ("zero2", 1, ("zero2x2", 4)),  # 2 ranks -> 1
    "zero2x1-on-2": ("zero2", 2, ("zero2x1", 6)),  # 1 rank -> 2
    "zero3x2": ("zero3", 2, ("zero2x2", 4)),  # zero2 -> zero3
    "zero3x2-again": ("zero3", 2, ("zero3x2", 6)),  # exact
    "zero3x1": ("zero3", 1, ("zero3x2", 6)),  # 2 ranks -> 1
    "ddpx2": ("ddp", 2, ("zero3x2", 6)),  # zero3 -> ddp
    "ddpx2-to-zero2": ("zero2", 2, ("ddpx2", 8)),  # ddp -> zero2
}


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """Shards of 1000 rows: a held-out split of 2000 rows gives each of 2 ranks one eval chunk
    (ZeRO-3 evaluation gathers parameters per batch, so ranks must see as many eval batches)."""
    return _write_shards(tmp_path_factory.mktemp("small_acts"), 6, 1000)


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, small_shards):
    """LAYOUT_RUNS made on first use through tests/workers/zero_state_worker.py: each folder holds
    run/ and dump/ (the live state at every save and after the resume), stderr.txt, summary.json."""
    root = tmp_path_factory.mktemp("layouts")
    cfg = _files_cfg(root, small_shards, steps=LAYOUT_STEPS, keep_checkpoints=5)
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            strategy, nproc, origin = LAYOUT_RUNS[name]
            folder = root / name
            if origin:
                shutil.copytree(get(origin[0]) / "run", folder / "run")
                for p in checkpoint.list_checkpoints(folder / "run" / "checkpoints"):
                    if checkpoint.step_of(p) > origin[1]:
                        shutil.rmtree(p)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(STATE_WORKER), str(cfg), str(folder / "dump"), f"run_dir={folder / 'run'}",
                   f"dist.strategy={strategy}", "eval.tokens=2000", "eval.every_steps=0"]
            done_run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert done_run.returncode == 0, done_run.stderr[-4000:]
            (folder / "stderr.txt").write_text(done_run.stderr)
            done[name] = folder
        return done[name]

    return get


def _same_live_state(saved: Path, restored: Path) -> None:
    """Weights, fp32 master weights, Adam moments, step, lr, schedule position and dead-latent
    counters, bit for bit. ddp has no separate master weights: its weights stand in for them."""
    a, b = load_file(str(saved)), load_file(str(restored))
    if not any(k.startswith("master.") for k in a):
        a |= {"master." + k[len("module."):]: v for k, v in a.items() if k.startswith("module.")}
    if not any(k.startswith("master.") for k in b):
        a = {k: v for k, v in a.items() if not k.startswith("master.")}
    assert set(a) == set(b)
    assert {"step", "lr", "scheduler_epoch", "tokens_since_fired", "fire_counts", "exp_avg.sae.decoder_weight",
            "exp_avg_sq.sae.encoder_bias"} <= set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{restored.name}: {key} differs"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, (_, _, origin) in LAYOUT_RUNS.items() if origin])
def test_checkpoints_resume_under_other_strategies_and_world_sizes(layout_runs, name):
    strategy, nproc, (origin, step) = LAYOUT_RUNS[name]
    old_strategy, old_nproc, _ = LAYOUT_RUNS[origin]
    folder, source = layout_runs(name), layout_runs(origin)
    err = (folder / "stderr.txt").read_text()
    assert f"resuming from {folder / 'run' / 'checkpoints' / f'step_{step:08d}'} " in err
    exact = (strategy, nproc) == (old_strategy, old_nproc)
    if exact:
        assert "the data stream continues where it stopped" in err and "elastic" not in err
    else:
        assert f"elastic resume from {old_strategy}/replicated on {old_nproc} rank(s)" in err
        assert ("the data stream continues where it stopped" in err) == (nproc == old_nproc)
    for sae in ("s", "abs"):  # restored exactly what the other layout held when it saved
        _same_live_state(source / "dump" / f"saved_{step}.{sae}.safetensors",
                         folder / "dump" / f"resumed_{step}.{sae}.safetensors")
    summary = json.loads((folder / "dump" / "summary.json").read_text())
    assert (summary["steps"], summary["strategy"], summary["world_size"]) == (LAYOUT_STEPS, strategy, nproc)
    assert all(0 < m["fvu"] < 1.5 for m in summary["saes"].values())  # and trained on
    if exact:  # bitwise the same weights and optimizer state at the end as the run it resumed
        _same_weights(_final(source / "run"), _final(folder / "run"), ["s", "abs"])
        for sae in ("s", "abs"):
            _same_live_state(source / "dump" / f"saved_{LAYOUT_STEPS}.{sae}.safetensors",
                             folder / "dump" / f"saved_{LAYOUT_STEPS}.{sae}.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2x2", "zero3x2"])
def test_zero_checkpoints_hold_no_pickles_and_each_rank_writes_its_partition(layout_runs, name):
    folder = layout_runs(name)
    path = folder / "run" / "checkpoints" / "step_00000006"
    for f in path.iterdir():  # nothing that needs unpickling
        assert f.is_file(), f
        if f.suffix == ".safetensors":
            load_file(str(f))
        elif f.suffix == ".json":
            json.loads(f.read_text())
        else:
            assert f.name == "config.yaml", f
            yaml.safe_load(f.read_text())
    for sae in ("s", "abs"):
        live = load_file(str(folder / "dump" / f"saved_6.{sae}.safetensors"))  # DeepSpeed's own full view
        saved = checkpoint.read_saved(path, sae)
        metas = [part.meta["pieces"] for part in saved.local]  # each rank's own partition
        pieces = saved_optimizer(saved)
        total = 0
        for param in {p for m in metas for p in m["params"]}:
            shape = metas[0]["params"].get(param, metas[1]["params"].get(param))["shape"]
            numel = int(np.prod(shape))
            assert sum(m["params"][param]["numel"] for m in metas if param in m["params"]) == numel
            total += numel
            for key in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(pieces.read(param, key, 0, numel).view(shape), live[f"{key}.{param}"])
        held = [sum(p["numel"] for p in m["params"].values()) for m in metas]
        assert all(0 < h < total for h in held) and sum(held) == total, held  # each rank: its own part
