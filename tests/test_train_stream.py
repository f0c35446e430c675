"""data.prefetch_batches: a producer thread makes the next activation batches while the SAE
steps run (framework/train_stream.py). Same results as the loop's own thread, bit for bit,
through periodic evaluations (which pause the producer) and a stop + resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework import train as train_module
from framework.config import load_config
from framework.errors import ConfigError
from framework.preemption import Preempted
from framework.train import train
from framework.train_stream import TrainStream

SAES = ("resid", "tc")


def _cfg(folder: Path, text_dir: Path, prefetch: int):
    cfg = {
        "run_dir": str(folder),
        "model": {"name": "tiny-gpt2"},
        "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 4, "prefetch_batches": prefetch},
        "saes": [{"name": "resid", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4, "dead_after_tokens": 512},
                 {"name": "tc", "site": "blocks.0.mlp_in", "output_site": "blocks.0.mlp_out", "n_latents": 64,
                  "k": 4}],
        "train": {"total_tokens": 20 * 128, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 300,
                  "checkpoint_every": 0},
        "eval": {"tokens": 128, "splice_tokens": 64, "every_steps": 6},
        "log": {"progress": False, "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / f"{folder.name}.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(folder.parent / f"{folder.name}.yaml")


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return {f"{n}/{k}": v for n in SAES for k, v in load_file(str(folder / f"{n}.safetensors")).items()}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_prefetched_run_trains_what_the_sequential_run_trains(tmp_path, text_dir):
    sequential = train(_cfg(tmp_path / "sequential", text_dir, 0))
    prefetched = train(_cfg(tmp_path / "prefetched", text_dir, 3))
    _assert_bitwise(_final_tensors(tmp_path / "sequential"), _final_tensors(tmp_path / "prefetched"))
    for key in ("tokens", "steps", "nonfinite_tokens_skipped", "outlier_tokens_dropped"):
        assert sequential[key] == prefetched[key], key
    assert sequential["saes"] == prefetched["saes"]  # the same evaluation numbers
    assert prefetched["prefetch_batches"] == 3 and prefetched["activation_tokens_per_s"] > 0
    assert 0 < sequential["train_vs_activation_rate"]


def test_prefetched_stop_and_resume_equals_the_sequential_run(tmp_path, text_dir, monkeypatch):
    """Stopped at step 7 while the producer is batches ahead: the checkpoint holds the position
    of the last batch used, so the resumed run ends where an uninterrupted one does."""
    train(_cfg(tmp_path / "straight", text_dir, 0))
    calls = iter(range(1, 10**6))
    monkeypatch.setattr(train_module.PreemptionFlag, "should_stop", lambda self, engine: next(calls) == 7)
    with pytest.raises(Preempted):
        train(_cfg(tmp_path / "stopped", text_dir, 3))
    monkeypatch.undo()
    train(_cfg(tmp_path / "stopped", text_dir, 3))
    _assert_bitwise(_final_tensors(tmp_path / "straight"), _final_tensors(tmp_path / "stopped"))
    state = json.loads((tmp_path / "stopped" / "checkpoints" / "step_00000007" / "rank_00000.json").read_text())
    assert state["source"]["position"]["batches"] > 0


def test_the_producers_error_reaches_the_loop():
    class Failing:
        skipped = {"train": {}, "eval": {}}

        def stream_state(self):
            return {"position": {}, "skipped": {}}

        def batches(self, split):
            yield {"x": torch.zeros(2, 3)}
            raise OSError("disk gone")

    stream = TrainStream(Failing(), Failing(), depth=2)
    it = stream.batches()
    assert next(it)["x"].shape == (2, 3)
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_prefetch_refused_where_the_producer_would_need_collectives(tmp_path, text_dir):
    _cfg(tmp_path / "run", text_dir, 0)
    with pytest.raises(ConfigError, match="data.prefetch_batches"):
        load_config(tmp_path / "run.yaml", ["data.prefetch_batches=2", "dist.sae_placement=layer"])
    with pytest.raises(ConfigError, match="data.prefetch_batches: must be >= 0"):
        load_config(tmp_path / "run.yaml", ["data.prefetch_batches=-1"])
