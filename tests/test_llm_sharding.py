"""The frozen LLM sharded with DeepSpeed ZeRO-3 across ranks (model.shard=zero3).

One real 2-rank gloo job on CPU (tests/workers/zero3_worker.py under torchrun, with a hard
timeout so that a hang fails instead of blocking) loads tiny-gpt2 both ways ZeRO-3
can: built from its config with a fixed seed and then partitioned, and from a saved folder
straight into partitions. Against the unsharded models on the same token ids (different ones
per rank): every site of layers 0-2 from full and early-stopped forwards, the logits and the
LM-loss gradients gsae uses; each rank holds half of the parameter elements; early stops leave
DeepSpeed's state clean (negative control: without the cleanup they do not); an LLMSource whose
ranks' text streams have different lengths runs the same forwards and yields the same row
counts on both ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from framework import hooks, text_data
from framework.config import ConfigError, DataConfig, ModelConfig, load_config
from framework.llm import check_zero3_layout, load_frozen
from framework.lm_grads import lm_site_grads
from worker_results import load_result

WORKER = Path(__file__).parent / "workers" / "zero3_worker.py"
WORLD = 2
JOB_TIMEOUT_S = 150  # both ranks; a healthy job takes 20-35 s here, mostly start-up
SEED = 7
TOL = dict(rtol=1e-6, atol=1e-6)  # fp32; gathered weights are the same numbers, so in practice 0


def _torchrun(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """A 2-rank torchrun job (it picks the port and sets RANK / LOCAL_RANK); a hang fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_gpt2_saved")
    model, tok = load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"), seed=SEED + 1)  # not the built one's weights
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def job(tmp_path_factory, saved_model, text_dir) -> list[dict]:
    out = tmp_path_factory.mktemp("zero3")
    _torchrun(str(WORKER), str(out), str(saved_model), str(text_dir), timeout=JOB_TIMEOUT_S)
    return [load_result(out / f"rank{r}") for r in range(WORLD)]


@pytest.fixture(scope="module")
def references(saved_model) -> dict:
    return {"built": load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"), seed=SEED)[0],
            "loaded": load_frozen(ModelConfig(name=str(saved_model), device="cpu"))[0]}


def _sites(res: dict) -> list[str]:
    return sorted(res["built"]["full"])


@pytest.mark.parametrize("how", ["built", "loaded"])
def test_sharded_activations_equal_unsharded(job, references, how):
    ref_model = references[how]
    worst = 0.0
    for rank, res in enumerate(job):
        ids, got = res["ids"], res[how]
        specs = [hooks.parse_site(s) for s in _sites(res)]
        assert len(specs) == 3 * len(hooks.SITE_KINDS)  # every kind at 3 layers
        with torch.no_grad(), hooks.capture(ref_model, specs, stop_early=False) as want:
            logits = ref_model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got["logits"], logits, **TOL)
        for name, ref in want.items():
            torch.testing.assert_close(got["full"][name], ref, **TOL, msg=lambda m, n=name: f"rank {rank} {n}: {m}")
            worst = max(worst, (got["full"][name] - ref).abs().max().item())
        for captures in [*got["early"].values(), got["early_all"]]:
            for cap in captures:
                for name in set(cap) - {"_state"}:
                    torch.testing.assert_close(cap[name], want[name], **TOL)
                    worst = max(worst, (cap[name] - want[name]).abs().max().item())
    print(f"zero3 {how}: max |sharded - unsharded| over all sites = {worst:.3g}")


def test_each_rank_holds_its_share_of_the_parameters(job, references):
    total = sum(p.numel() for p in references["loaded"].parameters())
    n_params = len(list(references["loaded"].parameters()))
    for how in ("built", "loaded"):
        local = [res[how]["numel"][0] for res in job]
        assert all(res[how]["numel"][1] == total for res in job)
        assert sum(local) >= total  # every element lives on some rank (partitions are padded)
        for n in local:
            assert n <= total // WORLD + n_params, f"{how}: a rank holds {n} of {total} elements"
        print(f"zero3 {how}: per-rank parameter fraction {[round(n / total, 4) for n in local]}")


def test_early_stop_leaves_zero3_state_clean(job):
    for res in job:
        for how in ("built", "loaded"):
            got = res[how]
            clean = got["state_before"]
            assert clean["whole_params"] == []
            for cap in [c for caps in got["early"].values() for c in caps] + got["early_all"]:
                assert cap["_state"] == clean  # module stack back to its depth, nothing left gathered
        assert res["state_after_grads"] == res["loaded"]["state_before"]
        # negative control: the same early stops without the cleanup
        dirty = res["state_without_cleanup"]
        assert dirty["stack"] > clean["stack"] and dirty["whole_params"], dirty
        assert res["state_restored"] == clean


def test_lm_gradients_through_the_sharded_model(job, references):
    model = references["loaded"]
    for res in job:
        acts, grads, loss = lm_site_grads(model, res["ids"], list(res["grads"]))
        torch.testing.assert_close(res["loss"], loss, **TOL)
        for site in grads:
            assert grads[site].abs().sum() > 0
            torch.testing.assert_close(res["grads"][site], grads[site], **TOL)
            torch.testing.assert_close(res["grad_acts"][site], acts[site], **TOL)


def test_llm_source_keeps_ranks_in_lockstep(job, saved_model, text_dir):
    tok = load_frozen(ModelConfig(name=str(saved_model), device="cpu"))[1]
    data = DataConfig(paths=[str(text_dir)], context_size=24, llm_batch_size=3)
    own = [len(list(text_data.sequence_batches(data, tok, "eval", 0, r, WORLD))) for r in range(WORLD)]
    assert own[0] != own[1], "the ranks' eval streams should differ in length for this test to mean anything"
    a, b = job
    assert a["lockstep"] and b["lockstep"]
    assert len(a["eval_rows"]) == min(own)  # ends everywhere when the shortest stream ends
    assert a["eval_rows"] == b["eval_rows"] and a["train_rows"] == b["train_rows"]
    assert a["forwards"] == b["forwards"]
    assert a["train_has_grads"] and b["train_has_grads"]
    assert a["dropped"] + b["dropped"] > 0  # the outlier filter dropped different rows: levelling ran


def test_zero3_config_errors(tmp_path, text_dir):
    base = ["model.name=tiny-gpt2", f"data.paths=[{text_dir}]", "saes=[{site: blocks.1.resid_post}]",
            f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="model.shard: 'zero2' is not one of"):
        load_config(None, base + ["model.shard=zero2"])
    with pytest.raises(ConfigError, match="choose one way to split the LLM"):
        load_config(None, base + ["model.shard=zero3", "model.device_map=auto"])
    acts = tmp_path / "acts"
    acts.mkdir()
    with pytest.raises(ConfigError, match="data.source=activations runs no LLM"):
        load_config(None, base + ["model.shard=zero3", "data.source=activations", f"data.activations_dir={acts}"])
    three = base[:2] + [f"run_dir={tmp_path}", "model.shard=zero3", "dist.sae_placement=layer",
                        "saes=[{site: blocks.1.resid_post}, {site: blocks.2.resid_post}, {site: blocks.3.resid_post}]"]
    cfg = load_config(None, three)
    with pytest.raises(ConfigError, match="different numbers of eval-splice forwards"):
        check_zero3_layout(cfg, 2)
    check_zero3_layout(cfg, 3)  # one SAE per rank: the same forwards everywhere
    check_zero3_layout(load_config(None, three + ["eval.splice=false"]), 2)


@pytest.mark.slow
def test_two_rank_training_run_with_a_sharded_llm(tmp_path, text_dir):
    """A whole run through torchrun: a ZeRO-3 sharded LLM feeding a TopK and a gsae SAE (whose
    gradients flow back through the sharded layers), eval splicing included, ends without a hang."""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "tiny-gpt2", "shard": "zero3"},
        "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 4},
        "saes": [{"name": "resid", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4},
                 {"name": "g", "site": "blocks.2.resid_post", "kind": "gsae", "n_latents": 64, "k": 4}],
        "train": {"total_tokens": 1536, "batch_size": 256, "buffer_tokens": 512, "init_tokens": 256},
        "eval": {"tokens": 256, "splice_tokens": 64},
        "log": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _torchrun("-m", "framework", "train", str(path), "--quiet", timeout=300)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["steps"] == 6
    assert set(summary["lockstep_dropped_tokens"]) == {"train", "eval"}  # reported per split
    assert min(summary["lockstep_dropped_tokens"].values()) >= 0
    for name in ("resid", "g"):
        m = summary["saes"][name]
        assert 0 < m["fvu"] < 2 and m["l0"] <= 4 and "delta_ce" in m, (name, m)
