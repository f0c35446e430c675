"""Whole runs through the CLI: from a tiny LLM on real text, and from activation files."""

import json

import numpy as np
import pytest
import torch
import yaml

from framework import checkpoint, export
from framework.cli import main
from framework.config import load_config
from framework.placement import build_source, sae_sites
from framework.sae_trainer import SAETrainer, total_steps_for

EVAL_KEYS = {"fvu", "l0", "dead_frac", "dense_frac", "delta_ce", "kl", "ce_recovered"}


def _config(tmp_path, text_dir, model="tiny-llama"):
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name": model},
        "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8},
        "saes": [
            {"name": "resid", "site": "blocks.1.resid_post", "n_latents": 128, "k": 4},
            {"name": "tc", "site": "blocks.0.mlp_in", "output_site": "blocks.0.mlp_out", "n_latents": 64, "k": 4,
             "kind": "abstopk"},
        ],
        "train": {"total_tokens": 6144, "batch_size": 256, "buffer_tokens": 1024, "init_tokens": 512,
                  "warmup_steps": 2, "checkpoint_every": 10},
        "eval": {"tokens": 1024, "splice_tokens": 256},
        "log": {"every_steps": 5, "histogram_every": 10, "progress": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_llm_run_produces_everything(tmp_path, text_dir, capsys):
    path = _config(tmp_path, text_dir)
    assert main(["train", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "FVU=" in out and "dCE=" in out
    assert f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}" in out  # the exact command, and the exports
    assert f"exported resid: {run / 'export' / 'resid'}" in out and f"exported tc: {run / 'export' / 'tc'}" in out
    metrics = json.loads((run / "eval.json").read_text())
    assert set(metrics) == {"resid", "tc"}
    for name, m in metrics.items():
        assert EVAL_KEYS <= set(m), name
        assert 0 < m["fvu"] < 1.5 and 0 < m["l0"] <= 4
    assert metrics["resid"]["fvu"] < 0.9  # it learned something in 24 steps
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = checkpoint.latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000024"
    assert len(list((run / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints
    for name in metrics:
        folder = run / "export" / name
        assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    tc_cfg = json.loads((run / "export" / "tc" / "cfg.json").read_text())
    assert tc_cfg["metadata"]["hook_name"] == "blocks.0.ln2.hook_normalized"
    assert tc_cfg["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"

    # the checkpoint restores the exact trained weights, and the export is their folded form
    cfg = load_config(run / "config.yaml")
    source = build_source(cfg, torch.device("cpu"))
    sites = sae_sites(cfg, source)
    trainers = {s.name: SAETrainer(s, cfg.train, *sites[s.name], source.dims, total_steps_for(cfg.train),
                                   torch.device("cpu"), 99) for s in cfg.saes}
    checkpoint.restore(ckpt, trainers)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 24
    x = next(source.batches("eval"))
    for name, tr in trainers.items():
        loaded = export.load_exported(run / "export" / name)
        torch.testing.assert_close(loaded.reconstruct(x[tr.input_site]), tr.sae.reconstruct(x[tr.input_site]),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_activation_file_run(tmp_path):
    g = np.random.default_rng(0)
    dictionary = g.standard_normal((64, 16)).astype(np.float32)
    for i in range(3):
        codes = (g.random((3000, 64)) < 0.05) * g.exponential(1.0, (3000, 64))
        np.save(tmp_path / f"shard{i}.npy", (codes @ dictionary).astype(np.float32))
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "activations", "activations_dir": str(tmp_path)},
        "saes": [{"name": "s", "n_latents": 128, "k": 8}],
        "train": {"total_tokens": 40000, "batch_size": 500, "buffer_tokens": 2000, "init_tokens": 1000,
                  "warmup_steps": 5, "optimizer": "adam", "decay_fraction": 0.1},
        "eval": {"tokens": 1000},
        "log": {"progress": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--quiet"]) == 0
    m = json.loads((tmp_path / "run" / "eval.json").read_text())["s"]
    assert "delta_ce" not in m and m["fvu"] < 0.5 and m["eval_tokens"] == 1000
