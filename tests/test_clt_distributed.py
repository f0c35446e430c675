"""A cross-layer transcoder (TopK or JumpReLU) trained on 2 ranks (ddp, ZeRO-2, ZeRO-3) trains
the weights one process trains, within float tolerance (tests/workers/clt_dist_steps.py); a
TopK CLT latent-sharded over 2 ranks (`dist.latent_shards: 2`, framework/clt_sharding.py)
through the whole `sparsemill train` loop on tiny-gpt2 trains what one process trains (weights,
optimizer state, counters, per-layer and replacement-model metrics) and resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework import checkpoint
from framework.cli import main
from framework.config import ConfigError, load_config
from framework.runners import saved_optimizer
from launching import resumable_copy, saved_tensors, torchrun_train, write_config

WORKER = Path(__file__).parent / "workers" / "clt_dist_steps.py"
STRATEGIES = ["ddp", "zero2", "zero3"]  # zero1 shares zero2's code path (and the time budget)
KINDS = ["clt", "jumprelu_clt"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clt_dist")
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
               str(out), ",".join(STRATEGIES), ",".join(KINDS)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_train_what_one_trains(runs, strategy, kind):
    one, two = (load_file(str(runs / f"{kind}_{strategy}_w{w}.safetensors")) for w in (1, 2))
    assert {"decoders.0", "decoders.2", "encoder_weight"} <= set(one) and set(one) == set(two)
    assert one["encoder_bias"].abs().max() > 0  # the steps changed the weights (not two initialisations)
    if kind == "jumprelu_clt":  # the thresholds and the L0 controller moved too
        assert {"log_threshold", "log_coef", "coef_integral"} <= set(one) and one["coef_integral"].abs() > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=f"{kind}.{strategy}.{name}")


SHARDED_STEPS = 8


def _sharded_config(root: Path, text_dir: Path, name: str, kind: str = "clt", **dist) -> Path:
    cfg = {"run_dir": str(root / name), "model": {"name": "tiny-gpt2"},
           "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8},
           "saes": [{"name": "clt", "kind": kind, "n_latents": 48, "k": 4, "dead_after_tokens": 128, "aux_k": 8,
                     "options": {"layers": "0-3"}}],
           "train": {"total_tokens": SHARDED_STEPS * 128, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 256,
                     "warmup_steps": 2, "checkpoint_every": SHARDED_STEPS // 2},
           "eval": {"tokens": 256, "splice_tokens": 128}, "log": {"progress": False, "tensorboard": False},
           "dist": dist}
    return write_config(root, name, cfg)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, text_dir) -> Path:
    root = tmp_path_factory.mktemp("clt_latent_shards")
    assert main(["train", str(_sharded_config(root, text_dir, "one")), "--quiet"]) == 0
    torchrun_train(2, _sharded_config(root, text_dir, "sharded", latent_shards=2))
    return root


def test_latent_sharded_clt_trains_what_one_process_trains(sharded_runs):
    one, sharded = sharded_runs / "one", sharded_runs / "sharded"
    for step in (SHARDED_STEPS // 2, SHARDED_STEPS):
        a, b = saved_tensors(one, step, "clt"), saved_tensors(sharded, step, "clt")
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # whole tensors, gathered
        for k in a:  # atol: Adam amplifies the rounding of a near-zero gradient (a latent that barely
            # fired) to ~1e-5, against ~1e-2 per step of any real difference (lr ~ 1e-2 at this width)
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-4, msg=f"step {step} {k}")
    assert (saved_tensors(one, SHARDED_STEPS // 2, "clt")["tokens_since_fired"] >= 128).any()  # dead latents: AuxK ran
    opt = [saved_optimizer(checkpoint.read_saved(run / "checkpoints" / f"step_{SHARDED_STEPS:08d}", "clt")).whole()
           for run in (one, sharded)]
    assert opt[0].keys() == opt[1].keys()
    for param, moments in opt[0].items():
        for key, value in moments.items():
            torch.testing.assert_close(opt[1][param][key], value, rtol=1e-4, atol=1e-7, msg=f"{param}.{key}")
    m1, m2 = (json.loads((run / "eval.json").read_text())["clt"] for run in (one, sharded))
    for key in ("fvu", "l0", "dead_frac", "fvu.layer0", "fvu.layer3", "l0.layer2", "delta_ce", "kl"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    exported = sharded / "export" / "clt"
    assert sorted(p.name for p in exported.glob("W_dec_*.safetensors")) == [f"W_dec_{i}.safetensors" for i in range(4)]
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["latent_shards"] == 2


def test_latent_sharded_clt_resumes_exactly(sharded_runs):
    again = sharded_runs / "resumed"
    path = resumable_copy(sharded_runs / "sharded.yaml", "resumed", drop_step=SHARDED_STEPS)
    assert f"resuming from {again}/checkpoints/step_{SHARDED_STEPS // 2:08d}" in torchrun_train(2, path)
    a, b = saved_tensors(sharded_runs / "sharded", SHARDED_STEPS, "clt"), saved_tensors(again, SHARDED_STEPS, "clt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_jumprelu_clt_is_not_latent_sharded(tmp_path, text_dir):
    with pytest.raises(ConfigError, match="saes.0.kind: 'jumprelu_clt' cannot be latent-sharded"):
        load_config(_sharded_config(tmp_path, text_dir, "x", kind="jumprelu_clt", latent_shards=2))
