"""Real multi-process (gloo, CPU) runs: the same global batches give the same weights on 1 and
2 ranks for ddp and every ZeRO stage, with and without gradient accumulation (and DDP's inner
micro-steps do not all-reduce); whole training runs (data parallel with ZeRO-2, and
layer-distributed SAEs) through torchrun; impossible layouts fail early."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework.config import ConfigError, DataConfig, load_config
from framework import text_data
from framework.placement import check_layout

WORKER = Path(__file__).parent / "workers" / "dist_sae_steps.py"
STRATEGIES = ["ddp", "zero1", "zero2", "zero3"]
ACCUMULATIONS = [1, 2]


def _torchrun(nproc: int, *args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    for nproc in (1, 2):
        _torchrun(nproc, str(WORKER), str(out), ",".join(STRATEGIES), ",".join(map(str, ACCUMULATIONS)))
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_and_two_ranks_train_identical_weights(strategy_runs, strategy, accumulation):
    """With accumulation A, both layouts see the same global micro-batches (2 ranks: half of
    each); the step's loss is the mean of the A micro-batch losses."""
    run = f"{strategy}_a{accumulation}"
    one = load_file(str(strategy_runs / f"{run}_w1.safetensors"))
    two = load_file(str(strategy_runs / f"{run}_w2.safetensors"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    print(f"{run}: max |w(2 ranks) - w(1 rank)| = {_max_diff(one, two):.3g}")
    m1 = json.loads((strategy_runs / "metrics_w1.json").read_text())[run]
    m2 = json.loads((strategy_runs / "metrics_w2.json").read_text())[run]
    for key in ("fvu", "aux_loss", "l0", "dead_frac"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    assert m1["aux_loss"] > 0 and m1["dead_frac"] > 0  # the AuxK path was exercised
    if accumulation > 1:  # accumulation changed the trajectory (it is not a no-op)
        assert _max_diff(one, load_file(str(strategy_runs / f"{strategy}_a1_w1.safetensors"))) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp"])
def test_zero_stages_train_the_same_weights_as_ddp(strategy_runs, strategy):
    """Every ZeRO stage keeps its own fp32 master copy; the decoder renorm (and any kind's
    after-step change) must reach it, or ZeRO silently trains another model than ddp."""
    ddp = load_file(str(strategy_runs / "ddp_a1_w1.safetensors"))
    zero = load_file(str(strategy_runs / f"{strategy}_a1_w1.safetensors"))
    print(f"{strategy}: max |w(zero) - w(ddp)| = {_max_diff(ddp, zero):.3g}")
    for name in ddp:
        torch.testing.assert_close(zero[name], ddp[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_inner_micro_steps_do_not_all_reduce(strategy_runs):
    """DDP's reducer (a counting comm hook) runs as often per optimizer step with 2 micro-steps
    as with 1: the inner micro-step's backward is under no_sync."""
    m2 = json.loads((strategy_runs / "metrics_w2.json").read_text())
    assert m2["ddp_a1"]["reducer_calls_per_step"] >= 1
    assert m2["ddp_a2"]["reducer_calls_per_step"] == m2["ddp_a1"]["reducer_calls_per_step"]


EVERY_KIND_WORKER = Path(__file__).parent / "workers" / "every_kind_worker.py"
# kinds whose selection is per token (their 1- and 2-rank trajectories agree: every loss term
# is a share of the global batch's, framework/losses.py); batch-level kinds select over each
# rank's rows, and vtopk samples its noise per rank
PER_TOKEN_KINDS = ["abstopk", "gsae", "jumprelu", "matryoshka", "mpsae", "topafa", "topk"]


@pytest.fixture(scope="module")
def every_kind_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("kinds")
    for nproc in (1, 2):
        _torchrun(nproc, str(EVERY_KIND_WORKER), str(out), ",".join(STRATEGIES))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_kind_trains_on_two_ranks(every_kind_runs, strategy):
    """Every registered kind runs under ddp and each ZeRO stage on 2 ranks (mpsae once crashed
    under ddp: its frozen tied encoder got no gradient); per-token kinds train the weights
    one process trains."""
    from framework.kinds import SAE_KINDS

    for kind in sorted(k for k in SAE_KINDS if not SAE_KINDS[k].cross_layer):  # clt: tests/test_clt_distributed.py
        two = load_file(str(every_kind_runs / f"{strategy}_{kind}_w2.safetensors"))
        assert all(torch.isfinite(v.float()).all() for v in two.values()), kind
        if kind in PER_TOKEN_KINDS:
            one = load_file(str(every_kind_runs / f"{strategy}_{kind}_w1.safetensors"))
            for name in one:
                torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=f"{kind}.{name}")


@pytest.mark.slow
def test_engine_accepts_a_process_group_made_by_the_caller(tmp_path):
    _torchrun(2, str(EVERY_KIND_WORKER), str(tmp_path), "ddp", "--preinit")
    assert (tmp_path / "ddp_topk_w2.safetensors").is_file()


def _tiny_config(tmp_path, text_dir, **dist) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "tiny-gpt_neox"},
        "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 4},
        "saes": [{"name": "resid", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4},
                 {"name": "tc", "site": "blocks.2.mlp_in", "output_site": "blocks.2.mlp_out", "n_latents": 64, "k": 4}],
        "train": {"total_tokens": 2048, "batch_size": 256, "buffer_tokens": 512, "init_tokens": 256},
        "eval": {"tokens": 256, "splice_tokens": 64},
        "log": {"progress": False, "every_steps": 2},
        "dist": dist,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("dist", [{"strategy": "zero2"}, {"sae_placement": "layer"}], ids=["zero2", "layer"])
def test_two_process_training_run(tmp_path, text_dir, dist):
    path = _tiny_config(tmp_path, text_dir, **dist)
    done = _torchrun(2, "-m", "framework", "train", str(path), "--quiet")
    assert done.stdout.count("trained 2,048 tokens") == 1  # only rank 0 prints
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    for name in ("resid", "tc"):
        m = summary["saes"][name]
        assert 0 < m["fvu"] < 2 and m["l0"] <= 4 and "delta_ce" in m
        assert (run / "export" / name / "sae_weights.safetensors").is_file()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    assert state["world_size"] == 2 and state["saes"] == {"resid": 8, "tc": 8}
    assert summary["saes"]["resid"]["fvu"] < 1


@pytest.mark.slow
def test_layer_distributed_saes_train_what_one_process_trains(tmp_path):
    """Each owner receives every rank's rows of its site through the all-to-all, in rank order:
    the SAEs it trains equal those one process trains on the concatenated global batches."""
    worker = str(Path(__file__).parent / "workers" / "layer_worker.py")
    _torchrun(2, worker, str(tmp_path), timeout=240)
    done = subprocess.run([sys.executable, worker, str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("s0", "s1"):
        routed = load_file(str(tmp_path / f"{name}_routed.safetensors"))
        alone = load_file(str(tmp_path / f"{name}_alone.safetensors"))
        print(f"layer placement {name}: max |w(2 ranks) - w(1 process)| = {_max_diff(routed, alone):.3g}")
        for key in alone:
            torch.testing.assert_close(routed[key], alone[key], rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.mark.slow
def test_zero3_run_whose_ranks_hold_unequal_eval_batches(tmp_path):
    """The held-out rows form one file chunk, so rank 1 has no eval batch at all. Inference
    mode under ZeRO-3 is a collective gather: entering it per batch deadlocked here."""
    g = torch.Generator().manual_seed(0)
    acts = tmp_path / "acts"
    acts.mkdir()
    for i in range(2):
        codes = (torch.rand(3000, 40, generator=g) < 0.1).float() * torch.rand(3000, 40, generator=g)
        np.save(acts / f"shard{i}.npy", (codes @ torch.randn(40, 16, generator=g)).numpy())
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "activations", "activations_dir": str(acts)},
        "saes": [{"name": "s", "n_latents": 64, "k": 4}],
        "train": {"total_tokens": 2048, "batch_size": 256, "buffer_tokens": 512, "init_tokens": 256},
        "eval": {"tokens": 1000, "every_steps": 4},
        "log": {"progress": False, "tensorboard": False},
        "dist": {"strategy": "zero3"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    _torchrun(2, "-m", "framework", "train", str(tmp_path / "cfg.yaml"), "--quiet", timeout=240)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["saes"]["s"]["eval_tokens"] == 500  # eval.tokens / world, all from rank 0
    assert (tmp_path / "run" / "export" / "s" / "sae_weights.safetensors").is_file()


def test_impossible_layouts_fail_before_loading(tmp_path, text_dir):
    cfg = load_config(_tiny_config(tmp_path, text_dir), ["train.batch_size=255"])
    with pytest.raises(ConfigError, match="not divisible by the world size 2"):
        check_layout(cfg, 2)
    cfg = load_config(_tiny_config(tmp_path, text_dir, sae_placement="layer"))
    with pytest.raises(ConfigError, match="3 ranks but only 2 SAEs"):
        check_layout(cfg, 3)
    with pytest.raises(ConfigError, match="dist.strategy"):
        load_config(_tiny_config(tmp_path, text_dir), ["dist.strategy=zero4"])
    with pytest.raises(ConfigError, match="each SAE is trained whole by one rank"):
        load_config(_tiny_config(tmp_path, text_dir, sae_placement="layer", strategy="zero2"))
    with pytest.raises(ConfigError, match="needs train.optimizer: adam"):
        load_config(_tiny_config(tmp_path, text_dir), ["dist.strategy=zero2", "train.optimizer=signsgd_schedulefree"])


def test_ranks_read_disjoint_documents_that_cover_the_split(text_dir):
    cfg = DataConfig(paths=[str(text_dir)])
    full = list(text_data.documents(cfg, "eval", 0))
    shards = [list(text_data.documents(cfg, "eval", 0, rank=r, world=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(full) and shards[0] and shards[1]
    train = [list(itertools.islice(text_data.documents(cfg, "train", 0, rank=r, world=2), 20)) for r in range(2)]
    assert not set(train[0]) & set(train[1])
