"""Latent-sharded SAEs (dist.latent_shards) through the whole train loop, as real gloo jobs:
a 2-process run with 2 latent shards trains the same weights, optimizer state, dead-latent
counters and eval metrics as a 1-process run of the same config (same global batch and seed);
its export equals the gathered checkpoint weights; it resumes exactly from a checkpoint;
a 2 x 2 (data parallel x latent shards) mesh with gradient accumulation equals 2-rank data
parallel; a tiny LLM run (SAE + transcoder) agrees too; impossible layouts fail before any
model loads, and a checkpoint does not resume under another number of shards."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from framework.cli import main
from launching import resumable_copy, saved_tensors, torchrun_train, write_config
from framework.config import ConfigError, load_config
from framework.export import folded_tensors, load_exported
from framework import checkpoint
from framework.runners import saved_optimizer
from framework.kinds import build_sae
from framework.placement import check_layout

SAE = {"name": "s", "n_latents": 128, "k": 4, "dead_after_tokens": 128, "aux_k": 8}  # dead after 1 batch
STEPS = 8  # fp32: the shards sum x_hat in another order; over long runs a near-tie in some
# token's top k eventually flips (as between any two summation orders), so the runs are short


def _activations(folder: Path) -> Path:
    g = np.random.default_rng(0)
    dictionary = g.standard_normal((48, 16)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        codes = (g.random((2048, 48)) < 0.08) * g.exponential(1.0, (2048, 48))
        np.save(folder / f"shard{i}.npy", (codes @ dictionary + 0.3).astype(np.float32))
    return folder


def _config(root: Path, name: str, acts: Path, accumulation: int = 1, **dist) -> Path:
    cfg = {"run_dir": str(root / name), "data": {"source": "activations", "activations_dir": str(acts)},
           "saes": [SAE],
           "train": {"total_tokens": 128 * STEPS, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 256,
                     "warmup_steps": 2, "checkpoint_every": STEPS // 2, "grad_accumulation_steps": accumulation},
           "eval": {"tokens": 512}, "log": {"progress": False, "every_steps": 4, "tensorboard": False},
           "dist": dist}
    return write_config(root, name, cfg)


def _optimizer(run: Path, step: int):
    return saved_optimizer(checkpoint.read_saved(run / "checkpoints" / f"step_{step:08d}", "s"))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_shards")
    acts = _activations(root / "acts")
    assert main(["train", str(_config(root, "one", acts)), "--quiet"]) == 0
    torchrun_train(2, _config(root, "sharded", acts, latent_shards=2))
    return root


@pytest.mark.slow
def test_two_latent_shards_train_what_one_process_trains(runs):
    one, sharded = runs / "one", runs / "sharded"
    for step in (STEPS // 2, STEPS):
        a, b = saved_tensors(one, step, "s"), saved_tensors(sharded, step, "s")
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # whole tensors, gathered
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"step {step} {k}")
        print(f"step {step}: max |w(2 latent shards) - w(1 process)| = {_max_diff(a, b):.3g}")
    half = saved_tensors(one, STEPS // 2, "s")
    assert (half["tokens_since_fired"] >= SAE["dead_after_tokens"]).any()  # dead latents: AuxK ran
    state = [_optimizer(run, STEPS) for run in (one, sharded)]
    assert state[0].settings["scheduler"] == state[1].settings["scheduler"]
    for param, moments in state[0].whole().items():
        for key, value in moments.items():
            torch.testing.assert_close(state[1].whole()[param][key], value, rtol=1e-4, atol=1e-7)
    m1, m2 = (json.loads((run / "eval.json").read_text())["s"] for run in (one, sharded))
    for key in ("fvu", "l0", "dead_frac", "dense_frac", "cos"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["latent_shards"] == 2 and summary["steps"] == STEPS


@pytest.mark.slow
def test_export_of_the_sharded_run_is_the_gathered_sae(runs):
    weights = {k[4:]: v for k, v in saved_tensors(runs / "sharded", STEPS, "s").items() if k.startswith("sae.")}
    sae = build_sae("topk", 16, SAE["n_latents"], SAE["k"])
    sae.load_state_dict(weights)
    exported = load_file(str(runs / "sharded" / "export" / "s" / "sae_weights.safetensors"))
    for k, v in folded_tensors(sae).items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)
    loaded = load_exported(runs / "sharded" / "export" / "s")
    x = torch.randn(32, 16)
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sharded_run_resumes_exactly(runs):
    """Resume the 2-shard run from its halfway checkpoint: the end state is bitwise the same."""
    again = runs / "resumed"
    path = resumable_copy(runs / "sharded.yaml", "resumed", drop_step=STEPS)
    assert f"resuming from {again}/checkpoints/step_{STEPS // 2:08d}" in torchrun_train(2, path)
    a, b = saved_tensors(runs / "sharded", STEPS, "s"), saved_tensors(again, STEPS, "s")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    optim = [_optimizer(run, STEPS).whole() for run in (runs / "sharded", again)]
    for param, moments in optim[0].items():
        for key, value in moments.items():
            assert torch.equal(optim[1][param][key], value), (param, key)


def test_impossible_latent_shard_layouts_fail_before_loading(tmp_path):
    base = [f"data.activations_dir={tmp_path}", "data.source=activations", "saes=[{name: s, n_latents: 64, k: 4}]",
            "dist.latent_shards=2", "train.batch_size=256"]
    cfg = load_config(None, base)
    check_layout(cfg, 2)
    check_layout(cfg, 4)
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        check_layout(cfg, 3)
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size"):
        check_layout(load_config(None, [*base, "train.batch_size=255"]), 4)
    with pytest.raises(ConfigError, match=r"saes.0.n_latents: n_latents=63 is not divisible by the 2 latent shards"):
        load_config(None, [*base, "saes.0.n_latents=63"])
    with pytest.raises(ConfigError, match="saes.0.kind: 'batchtopk' cannot be latent-sharded"):
        load_config(None, [*base, "saes.0.kind=batchtopk"])
    with pytest.raises(ConfigError, match="works with dist.strategy: ddp and dist.sae_placement: replicated only"):
        load_config(None, [*base, "dist.strategy=zero2"])
    with pytest.raises(ConfigError, match="works with dist.strategy: ddp and dist.sae_placement: replicated only"):
        load_config(None, [*base, "dist.sae_placement=layer"])
    with pytest.raises(ConfigError, match="dist.latent_shards: must be >= 1"):
        load_config(None, [*base, "dist.latent_shards=0"])
    load_config(None, [*base, "saes.0.kind=abstopk"])


@pytest.mark.slow
def test_data_parallel_by_latent_shards_mesh_trains_what_data_parallel_trains(tmp_path):
    """4 processes as 2 data-parallel replicas x 2 latent shards read the data as 2-rank data
    parallel does (each replica its half, the shards of a replica the same batches); both
    accumulate 2 micro-batches per step (the mesh averages over replicas once, at the step)."""
    acts = _activations(tmp_path / "acts")
    torchrun_train(2, _config(tmp_path, "dp", acts, accumulation=2))
    torchrun_train(4, _config(tmp_path, "mesh", acts, accumulation=2, latent_shards=2))
    a, b = saved_tensors(tmp_path / "dp", STEPS, "s"), saved_tensors(tmp_path / "mesh", STEPS, "s")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    print(f"2x2 mesh: max |w(dp 2 x shards 2) - w(dp 2)| = {_max_diff(a, b):.3g}")


@pytest.mark.slow
def test_llm_run_with_latent_shards_matches_one_process(tmp_path, text_dir):
    """A tiny LLM feeds an SAE and a transcoder; both latent ranks run the LLM on the same
    text. Weights, firing counters and the spliced-LLM metrics agree with one process."""
    def config(name: str, **dist) -> Path:
        cfg = {"run_dir": str(tmp_path / name), "model": {"name": "tiny-gpt_neox"},
               "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 4},
               "saes": [{"name": "resid", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4},
                        {"name": "tc", "site": "blocks.2.mlp_in", "output_site": "blocks.2.mlp_out",
                         "n_latents": 64, "k": 4}],
               "train": {"total_tokens": 1024, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 256},
               "eval": {"tokens": 256, "splice_tokens": 64},
               "log": {"progress": False, "tensorboard": False}, "dist": dist}
        return write_config(tmp_path, name, cfg)

    assert main(["train", str(config("one")), "--quiet"]) == 0
    torchrun_train(2, config("sharded", latent_shards=2))
    m1, m2 = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("one", "sharded"))
    for name in ("resid", "tc"):
        a, b = (saved_tensors(tmp_path / run, 8, name) for run in ("one", "sharded"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
        print(f"LLM {name}: max |w(2 latent shards) - w(1 process)| = {_max_diff(a, b):.3g}")
        for key in ("fvu", "l0", "dead_frac", "delta_ce", "kl"):
            assert m2[name][key] == pytest.approx(m1[name][key], rel=1e-4, abs=1e-6), (name, key)


def test_resuming_under_another_number_of_latent_shards_is_refused(tmp_path):
    """The data layout (which ranks read which batches) depends on dist.latent_shards."""
    from framework.compatibility import config_differences  # noqa: PLC0415

    base = [f"data.activations_dir={tmp_path}", "data.source=activations", "saes=[{name: s, n_latents: 64, k: 4}]"]
    saved, now = (load_config(None, [*base, f"dist.latent_shards={t}"]).to_dict() for t in (2, 1))
    blocking, _ = config_differences(saved, now)
    assert blocking == ["dist.latent_shards: 2 -> 1"]
