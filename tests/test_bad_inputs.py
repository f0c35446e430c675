"""Bad input through the CLI, one row per case: a clear message naming the key, file or value,
a non-zero exit, no traceback (and nothing silently trained, scored or lost). The cases of a
review's battery of bad inputs; the planted-pickle and corrupted-checkpoint cases live in
tests/test_state.py, the skip counters in tests/test_eval_population.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from framework.cli import main

BASE = {
    "model": {"name": "tiny-gpt2"},
    "data": {"context_size": 32, "llm_batch_size": 4},
    "saes": [{"name": "r", "site": "blocks.1.resid_post", "n_latents": 32, "k": 4}],
    "train": {"total_tokens": 512, "batch_size": 128, "buffer_tokens": 256, "init_tokens": 128},
    "eval": {"tokens": 128, "splice": False},
    "log": {"progress": False, "tensorboard": False},
}


def _config(tmp_path: Path, text_dir: Path | None = None, **sections) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg["run_dir"] = str(tmp_path / "run")
    if text_dir is not None:
        cfg["data"]["paths"] = [str(text_dir)]
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _acts(tmp_path: Path, name: str = "acts") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"resid": torch.randn(3000, 16, generator=g)}, str(folder / "a.safetensors"))
    return folder


def _acts_config(tmp_path: Path, folder: Path) -> Path:
    return _config(tmp_path, data={"source": "activations", "activations_dir": str(folder)},
                   saes=[{"name": "r", "n_latents": 32, "k": 4}], model={"name": "tiny-gpt2"})


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


# --------------------------------------------------------------------------- config and environment

CONFIG_CASES = [  # (override, fragment of the message)
    ("train.device=cuda", "train.device=cuda: this machine has no usable CUDA device"),
    ("model.device=cuda", "model.device=cuda: this machine has no usable CUDA device"),
    ("model.device=gpu0", "model.device: 'gpu0' is not a device"),
    ("train.total_tokens.max=4", "train.total_tokens"),
    ("saes.first.k=4", "'saes' is a list; index it with a number"),
    ("train.total_tokens=64", "train.total_tokens=64 is smaller than train.batch_size=128"),
    ("data.paths=[{x: 1", "invalid YAML"),
]


@pytest.mark.parametrize("override,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(tmp_path, text_dir, capsys, override, fragment):
    rc, err = _run(capsys, "train", _config(tmp_path, text_dir), override)
    assert rc == 2 and fragment in err
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {name: tiny-gpt2}\nsaes:\n  - {site: blocks.1.resid_post, k: [4}\n")
    rc, err = _run(capsys, "train", path)
    assert rc == 2 and f"{path}:3:" in err and "invalid YAML" in err and len(err.strip().splitlines()) == 1


def test_run_dir_that_is_a_file_or_cannot_be_written(tmp_path, text_dir, capsys, read_only_dir):
    (tmp_path / "afile").write_text("x")
    rc, err = _run(capsys, "train", _config(tmp_path, text_dir), f"run_dir={tmp_path / 'afile'}")
    assert rc == 2 and "exists and is not a directory" in err
    rc, err = _run(capsys, "train", _config(tmp_path, text_dir), f"run_dir={read_only_dir / 'run'}")
    assert rc == 2 and f"run_dir: cannot write to '{read_only_dir / 'run'}'" in err


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to: chmod for users, a read-only bind mount for root, else
    a path under /sys (writable by no one)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-o", "bind,ro", str(folder), str(folder)], capture_output=True).returncode == 0
    yield folder if mounted else Path("/sys/sparsemill-test")
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_context_longer_than_the_models_positions(tmp_path, text_dir, capsys):
    rc, err = _run(capsys, "train", _config(tmp_path, text_dir), "data.context_size=600")
    assert rc == 2 and "data.context_size=600 is longer than the model's 512 positions" in err


def test_unknown_model_offline_names_the_key(tmp_path, text_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "framework", "train", str(_config(tmp_path, text_dir)),
                           "model.name=someone/no-such-model"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model.name: cannot load 'someone/no-such-model'" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr


# --------------------------------------------------------------------------- data


def test_whitespace_only_text_is_no_data(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "blank.txt").write_text("   \n\n\t  \n")
    rc, err = _run(capsys, "train", _config(tmp_path, tmp_path / "docs"))
    assert rc == 2 and ("held-out split is empty" in err or "no training documents" in err)
    assert not (tmp_path / "run" / "summary.json").exists()  # never a perfect score on nothing


def test_binary_file_named_txt(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.txt").write_text("some text " * 200)
    (tmp_path / "docs" / "image.txt").write_bytes(bytes(range(128, 256)) * 50)
    rc, err = _run(capsys, "train", _config(tmp_path, tmp_path / "docs"))
    assert rc == 2 and f"'{tmp_path / 'docs' / 'image.txt'}' is not UTF-8 text" in err


def _text_npy(folder: Path) -> None:
    (folder / "b.npy").write_text("0.1 0.2 0.3\n")


def _object_npy(folder: Path) -> None:
    np.save(folder / "b.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _truncated_safetensors(folder: Path) -> None:
    save_file({"resid": torch.randn(100, 16)}, str(folder / "b.safetensors"))
    data = (folder / "b.safetensors").read_bytes()
    (folder / "b.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,fragment", [
    (_text_npy, "not a .npy file"),
    (_object_npy, "it holds Python objects, which are never loaded"),
    (_truncated_safetensors, "not a readable safetensors file"),
], ids=["text-npy", "object-npy", "truncated-safetensors"])
def test_unreadable_activation_shards_name_the_file(tmp_path, capsys, damage, fragment):
    folder = _acts(tmp_path)
    damage(folder)
    rc, err = _run(capsys, "train", _acts_config(tmp_path, folder))
    assert rc == 2 and "activation shard" in err and str(folder / "b.") in err and fragment in err
    assert "allow_pickle" not in err and "weights_only" not in err  # never suggests unsafe loading


@pytest.mark.parametrize("site", ["", "resid"], ids=["inferred", "named"])
def test_activation_tensors_not_named_like_hook_sites_train_and_export(tmp_path, capsys, site):
    rc, _ = _run(capsys, "train", _acts_config(tmp_path, _acts(tmp_path)), f"saes.0.site={site}")
    assert rc == 0
    cfg = json.loads((tmp_path / "run" / "export" / "r" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "resid"
    assert _run(capsys, "export", tmp_path / "run")[0] == 0  # from the checkpoint too


def test_eval_tokens_beyond_the_held_out_split_warn_with_both_numbers(tmp_path, text_dir, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        rc, _ = _run(capsys, "train", _config(tmp_path, text_dir), "eval.tokens=10000000")
    assert rc == 0
    warning = next(r.getMessage() for r in caplog.records if "eval.tokens=10000000" in r.getMessage())
    have = int(warning.split("only ")[1].split()[0])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["saes"]["r"]["eval_tokens"] <= have < 10_000_000


# --------------------------------------------------------------------------- runs and checkpoints


def test_refused_resume_writes_nothing(tmp_path, text_dir, capsys):
    path = _config(tmp_path, text_dir)
    assert _run(capsys, "train", path)[0] == 0
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    rc, err = _run(capsys, "train", path, "saes.0.n_latents=64")
    assert rc == 1 and "saes.0.n_latents: 32 -> 64" in err
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before


def test_dangling_latest_pointer_is_said_and_repaired(tmp_path, text_dir, capsys, caplog):
    path = _config(tmp_path, text_dir)
    assert _run(capsys, "train", path, "train.checkpoint_every=2")[0] == 0
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step_00000099")
    with caplog.at_level(logging.WARNING):
        assert _run(capsys, "train", path, "train.total_tokens=640")[0] == 0
    assert "names 'step_00000099', which does not exist; repointing it to step_00000004" in caplog.text
    assert (root / "latest").read_text() == "step_00000005"  # repaired, then advanced by the new save


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_inspect_and_export_of_a_missing_run_dir(tmp_path, capsys, command):
    rc, err = _run(capsys, command, tmp_path / "nowhere")
    assert rc == 1 and f"run directory '{tmp_path / 'nowhere'}' does not exist" in err
