"""Weights & Biases beside TensorBoard (`log.wandb`), offline (no network): the same scalars and
density histograms reach it, a resumed run continues the same wandb run, and wandb is never
imported when it is off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from framework.cli import main

wandb = pytest.importorskip("wandb")


def _config(tmp_path, text_dir, total_tokens):
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": "tiny-llama", "device": "cpu"},
           "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8},
           "saes": [{"name": "resid", "site": "blocks.1.resid_post", "n_latents": 32, "k": 4}],
           "train": {"total_tokens": total_tokens, "batch_size": 256, "buffer_tokens": 512, "init_tokens": 256,
                     "warmup_steps": 1, "device": "cpu"},
           "eval": {"tokens": 256, "splice": False},
           "log": {"every_steps": 1, "histogram_every": 2, "progress": False,
                   "wandb": {"project": "sparsemill-test", "mode": "offline"}}}
    path = tmp_path / f"cfg_{total_tokens}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB
    whose records have a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2  # noqa: PLC0415

    data, pos, block, parts = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            parts = b""
            yield rec
        elif kind == 0:
            break


def _history(run_dir: Path, run_id: str) -> tuple[set, set]:
    """(scalar keys, histogram keys) logged to the offline runs with this id, from wandb's files."""
    scalars, hists = set(), set()
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, sorted(p.name for p in (run_dir / "wandb").iterdir())
    for path in files:
        for rec in _records(path):
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if key.endswith("/_type") and "histogram" in item.value_json:  # a histogram's flattened fields
                    hists.add(key[: -len("/_type")])
                elif "/" in key and not key.rsplit("/", 1)[1].startswith("_"):
                    scalars.add(key)
    return scalars, hists


def test_offline_wandb_gets_the_scalars_and_a_resumed_run_continues_it(tmp_path, text_dir, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(["train", str(_config(tmp_path, text_dir, 1024)), "--quiet"]) == 0
    run_id = (run / "wandb_run_id").read_text().strip()
    assert run_id and list(run.glob(f"tensorboard/events.out.tfevents.*"))
    scalars, hists = _history(run, run_id)
    assert {"train/resid/fvu", "train/resid/l0", "train/tokens", "eval/resid/fvu"} <= scalars
    assert {"train/resid/log10_density", "eval/resid/log10_density"} <= hists
    (run / "wandb_run_id").unlink()  # the id also travels in the checkpoint (the logger's state)
    assert main(["train", str(_config(tmp_path, text_dir, 2048)), "--quiet"]) == 0
    assert (run / "wandb_run_id").read_text().strip() == run_id
    assert len(list(run.glob(f"wandb/offline-run-*-{run_id}"))) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 2048


def test_wandb_is_not_imported_when_off(tmp_path):
    code = ("import sys; from framework.logs import RunLogger; from framework.schema import LogConfig; "
            f"lg = RunLogger(__import__('pathlib').Path({str(tmp_path)!r}), LogConfig(progress=False), 10); "
            "lg.begin(0); lg.scalar('a', 1.0, 1); lg.close(); assert 'wandb' not in sys.modules, 'imported'")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_a_wrong_wandb_mode_is_a_config_error():
    from framework.config import ConfigError, load_config  # noqa: PLC0415

    with pytest.raises(ConfigError, match="log.wandb.mode: 'ofline'"):
        load_config(None, ["log.wandb.project=x", "log.wandb.mode=ofline"])
    with pytest.raises(ConfigError, match="unknown config key 'log.wandb.projet'"):
        load_config(None, ["log.wandb.projet=x"])
