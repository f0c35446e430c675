"""JumpReLU SAEs/transcoders: the fused-kernel forward and its pseudo-gradients equal a dense
reference, nothing of size batch x latents is kept for backward, thresholds start where the
requested L0 is, the L0 controller steers, bad options fail naming the key, training resumes
bitwise, and the export loads in SAELens (`jumprelu`, `jumprelu_transcoder`) computing the same."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework import export
from framework.config import ConfigError, SAEConfig, TrainConfig, load_config
from framework.kinds import build_sae
from framework.sae_trainer import SAETrainer
from framework.train import train

D, N = 16, 96
MARGIN = 1e-3  # no pre-activation this close to a selection boundary (theta, theta +- eps/2)


def _sae(d_out=None, seed=0, **options):
    torch.manual_seed(seed)
    sae = build_sae("jumprelu", D, N, 4, d_out=d_out, seed=seed, options={"bandwidth": 0.3, **options})
    with torch.no_grad():  # thresholds spread around the pre-activations' scale
        sae.log_threshold.copy_(torch.empty(N).uniform_(math.log(0.2), math.log(0.9)))
        sae.encoder_bias.normal_(0, 0.1)
        sae.encoder_weight.mul_(3.0)
    return sae.train()


def _dense_pre(sae, x):
    return ((x.double() - sae.input_offset().double()) @ sae.encoder_weight.double().T + sae.encoder_bias.double())


@torch.no_grad()
def _min_boundary_distance(sae, x) -> float:
    pre, theta = _dense_pre(sae, x), sae.threshold().double()
    eps = sae.options.bandwidth
    return min(float((pre - theta - s).abs().min()) for s in (0.0, eps / 2, -eps / 2))


@torch.no_grad()
def _clear_thresholds(sae, x) -> None:
    """Per latent, the first threshold of a grid in [0.2, 0.9] with no pre-activation of x
    within MARGIN of it or of its window's edges: the fused and the dense paths then select
    the same entries whatever their rounding."""
    pre, eps = _dense_pre(sae, x), sae.options.bandwidth
    grid = torch.linspace(0.2, 0.9, 701, dtype=torch.float64)
    dist = torch.stack([(pre[:, :, None] - grid - s).abs().amin(0) for s in (0.0, eps / 2, -eps / 2)]).amin(0)
    ok = dist > 2 * MARGIN  # [n_latents, grid]
    assert bool(ok.any(1).all())
    sae.log_threshold.copy_(grid[ok.float().argmax(1)].log().float())


def dense_reference(sae, x, y):
    """The JumpReLU objective with dense tensors and the papers' pseudo-derivatives written as
    zero-valued terms whose gradient is the pseudo-derivative (c * (t - t.detach()))."""
    o = sae.options
    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    offset = params["b_dec"] if not sae.is_transcoder else torch.zeros(D)
    pre = (x - offset) @ params["encoder_weight"].T + params["encoder_bias"]
    theta = params["log_threshold"].exp()
    active = (pre > theta).detach()
    window = ((pre - theta).abs() < o.bandwidth / 2).detach().float()
    eps = o.bandwidth
    ste_in = float(o.ste_to_input)
    a = torch.where(active, pre, torch.zeros(())) - (theta.detach() / eps) * window * (theta - theta.detach()) \
        + ste_in * (theta.detach() / eps) * window * (pre - pre.detach())
    if o.sparsity == "step":
        s = active.float() - window / eps * (theta - theta.detach()) + ste_in * window / eps * (pre - pre.detach())
    else:
        s = torch.tanh(o.tanh_scale * a)
    x_hat = a @ params["decoder_weight"] + params["b_dec"]
    loss = (x_hat - y).pow(2).sum() + sae.coefficient() * s.sum(1).mean()
    loss.backward()
    return x_hat.detach(), {name: p.grad for name, p in params.items()}


CASES = [(None, "step", False), (5, "step", False), (None, "tanh", False), (None, "step", True), (5, "tanh", True)]


@pytest.mark.parametrize("d_out,sparsity,ste", CASES)
def test_fused_forward_and_pseudo_gradients_match_dense(d_out, sparsity, ste):
    sae = _sae(d_out, sparsity=sparsity, ste_to_input=ste, l0_coef=0.05)
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(1))
    y = torch.randn(200, d_out or D, generator=torch.Generator().manual_seed(2)) if d_out else x
    _clear_thresholds(sae, x)
    assert _min_boundary_distance(sae, x) > MARGIN  # selections cannot differ between the two paths
    ref_x_hat, ref_grads = dense_reference(sae, x, y)
    out = sae(x)
    loss = (out.x_hat - y).pow(2).sum() + out.losses["l0"]
    loss.backward()
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-4, atol=1e-4)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-3, msg=name)
    assert ref_grads["log_threshold"].abs().sum() > 0  # the window is populated: the check has teeth
    # the packed output holds the active entries and the zero-valued window entries below theta
    pre, theta = _dense_pre(sae, x), sae.threshold().double()
    dense_codes = torch.zeros(200, N).scatter_add(1, out.indices, out.values.detach())
    torch.testing.assert_close(dense_codes.double(), torch.where(pre > theta, pre, 0.0), rtol=1e-5, atol=1e-5)
    assert int((out.values != 0).sum()) == int((pre > theta).sum())


def test_no_batch_by_latents_tensor_is_saved_for_backward():
    B, n = 128, 4096
    sae = build_sae("jumprelu", D, n, 4).train()
    x = torch.randn(B, D)
    sae.init_from_sample(x, x, True, "mean")
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sae(sae.normalize_input(x))
        (out.x_hat.pow(2).sum() + out.losses["l0"]).backward()
    biggest = sorted(saved, key=math.prod)[-3:]
    assert saved and math.prod(biggest[-1]) < B * n // 4, biggest  # the largest: the encoder weight (n x d)
    assert not [s for s in saved if B in s and n in s], biggest
    assert sae.log_threshold.grad is not None and sae.encoder_weight.grad is not None


def test_inference_selects_above_the_learned_thresholds():
    sae = _sae()
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(3))
    _clear_thresholds(sae, x)
    assert _min_boundary_distance(sae, x) > MARGIN
    train_out = sae(x)
    sae.eval()
    out = sae(x)
    pre, theta = _dense_pre(sae, x), sae.threshold().double()
    codes = torch.zeros(200, N).scatter_add(1, out.indices, out.values)
    torch.testing.assert_close(codes.double(), torch.where(pre > theta, pre, 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat, train_out.x_hat.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [0.0, 6.0])
def test_thresholds_start_where_the_sample_fires_the_requested_l0(target):
    sae = build_sae("jumprelu", D, N, 4, options={"target_l0": target} if target else {})
    x = torch.randn(512, D) * 2 + 1
    sae.init_from_sample(x, x, True, "geometric_median")
    sae.eval()
    l0 = (sae(sae.normalize_input(x)).values != 0).sum(1).double().mean().item()
    assert abs(l0 - (target or 4)) < 0.05, l0
    assert torch.equal(sae.log_threshold, sae.log_threshold[0].expand(N))  # one value for all latents at start


def test_threshold_lr_scale_reparameterises_without_changing_the_function(tmp_path):
    x = torch.randn(256, D) * 2
    plain, fast = (build_sae("jumprelu", D, N, 4, options={"threshold_lr_scale": s}) for s in (1.0, 5.0))
    for sae in (plain, fast):
        sae.init_from_sample(x, x, True, "mean")
    torch.testing.assert_close(fast.threshold(), plain.threshold())
    torch.testing.assert_close(fast.log_threshold * 5, plain.log_threshold)
    folder = export.export_sae(fast, tmp_path / "e", "jumprelu", {})
    loaded = export.load_exported(folder)
    torch.testing.assert_close(loaded.threshold(), fast.threshold() / fast.output_scale)


def _synthetic_trainer(options, n=128, k=6, steps=120):
    from framework.synthetic import SyntheticActivations, SyntheticConfig  # noqa: PLC0415

    gen = SyntheticActivations(SyntheticConfig(d=D, n_features=64, mean_l0=4.0, seed=0))
    x, _ = gen.sample(steps * 256 + 1024, torch.Generator().manual_seed(5))
    cfg = SAEConfig(name="j", kind="jumprelu", n_latents=n, k=k, options=options, dead_after_tokens=4096, lr=4e-3)
    tr = SAETrainer(cfg, TrainConfig(warmup_steps=5, total_tokens=steps * 256, batch_size=256), "x", "x", {"x": D},
                    steps, torch.device("cpu"), 0)
    tr.init_from_sample(x[:1024], x[:1024], True, "geometric_median")
    return tr, x[1024:]


def test_controller_steers_a_dense_start_to_the_target_l0():
    # a dense start, and thresholds that may move ~10 lr per step (log space) so 120 steps can fix it
    tr, x = _synthetic_trainer({"threshold_init": 0.1, "threshold_lr_scale": 10.0})
    l0s, integral = [], []
    for step in range(120):
        m = tr.step(x[step * 256:(step + 1) * 256], x[step * 256:(step + 1) * 256])
        l0s.append(m.l0.item())
        integral.append(tr.sae.coef_integral.item())
    assert l0s[0] > 30  # threshold 0.1: a third of the latents fire
    above = [i for i in range(120) if min(l0s[: i + 1]) > 6]  # while the L0 stayed above the target (k = 6) ...
    assert len(above) > 10 and all(integral[i] > integral[i - 1] for i in above[1:])  # ... lambda's I grew
    late = sum(l0s[-20:]) / 20
    assert 4.5 < late < 8.0, late  # and the L0 settled near the target
    assert int(tr.sae.coef_steps) == 120


def test_fixed_coefficient_warms_up_and_never_adapts():
    tr, x = _synthetic_trainer({"l0_coef": 0.01, "coef_warmup_steps": 4}, steps=6)
    seen = []
    for step in range(6):
        seen.append(tr.sae.coefficient().item())
        tr.step(x[step * 256:(step + 1) * 256], x[step * 256:(step + 1) * 256])
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_bad_options_fail_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"options\.l0_coef / options\.target_l0: give one"):
        build_sae("jumprelu", 4, 8, 2, options={"l0_coef": 1e-3, "target_l0": 8})
    for bad in ({"bandwidth": 0.0}, {"bandwidth": -0.1}, {"bandwidth": float("nan")}):
        with pytest.raises(ConfigError, match=r"options\.bandwidth"):
            build_sae("jumprelu", 4, 8, 2, options=bad)
    for bad in ({"threshold_init": -1.0}, {"threshold_init": float("inf")}):
        with pytest.raises(ConfigError, match=r"options\.threshold_init"):
            build_sae("jumprelu", 4, 8, 2, options=bad)
    with pytest.raises(ConfigError, match=r"options\.sparsity: 'l1'"):
        build_sae("jumprelu", 4, 8, 2, options={"sparsity": "l1"})
    with pytest.raises(ConfigError, match=r"options\.l0_coef / options\.target_l0: must be >= 0"):
        build_sae("jumprelu", 4, 8, 2, options={"target_l0": -2})
    (tmp_path / "acts").mkdir()
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{source: activations, activations_dir: '{tmp_path / 'acts'}'}}\n"
                    "saes:\n  - {kind: jumprelu, options: {target_l0: 8}}\n")
    assert load_config(path).saes[0].options == {"target_l0": 8}
    with pytest.raises(ConfigError, match=r"saes\.0\.options\.l0_coef / options\.target_l0: give one"):
        load_config(path, ["saes.0.options.l0_coef=0.001"])
    with pytest.raises(ConfigError, match=r"saes\.0\.options\.bandwidth"):
        load_config(path, ["saes.0.options.bandwidth=0"])
    with pytest.raises(ConfigError, match=r"saes\.0\.options\.bandwith.*did you mean 'bandwidth'"):
        load_config(path, ["saes.0.options.bandwith=0.1"])


# ----------------------------------------------------------------------------- exact resume


def _shards(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(48, D, generator=g)
    for i in range(2):
        codes = (torch.rand(3000, 48, generator=g) < 0.08) * torch.empty(3000, 48).exponential_(generator=g)
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file({"x": (codes @ dictionary).contiguous()}, str(folder / f"shard{i}.safetensors"))
    return folder


def _files_run(tmp_path: Path, text_dir: Path) -> dict:
    acts = tmp_path / "acts"
    acts.mkdir()
    _shards(acts)
    return {"data": {"source": "activations", "activations_dir": str(acts)},
            "saes": [{"name": "j", "kind": "jumprelu", "n_latents": 64, "k": 4, "dead_after_tokens": 512,
                      "options": {"bandwidth": 0.1}},
                     {"name": "jt", "kind": "jumprelu", "n_latents": 32, "k": 3,
                      "options": {"l0_coef": 0.003, "sparsity": "tanh", "coef_warmup_steps": 5}}]}


def _skip_transcoder_run(tmp_path: Path, text_dir: Path) -> dict:
    return {"model": {"name": "tiny-gpt2"}, "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 4},
            "saes": [{"name": "j", "kind": "jumprelu", "site": "blocks.1.mlp_in", "output_site": "blocks.1.mlp_out",
                      "n_latents": 64, "k": 4, "skip_connection": True, "dead_after_tokens": 512},
                     {"name": "jt", "kind": "topk", "site": "blocks.0.mlp_in", "output_site": "blocks.0.mlp_out",
                      "n_latents": 32, "k": 3, "skip_connection": True}]}


@pytest.mark.parametrize("layout", [_files_run, _skip_transcoder_run], ids=["jumprelu-files", "skip-transcoders-text"])
def test_stop_and_resume_is_bitwise_equal_to_a_straight_run(tmp_path, text_dir, monkeypatch, layout):
    from framework import train as train_module  # noqa: PLC0415
    from framework.preemption import Preempted  # noqa: PLC0415

    cfg = {**layout(tmp_path, text_dir),
           "train": {"total_tokens": 14 * 128, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 300,
                     "warmup_steps": 2, "checkpoint_every": 0},
           "eval": {"tokens": 256, "splice": False}, "log": {"progress": False, "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def run(name):
        return load_config(path, [f"run_dir={tmp_path / name}"])

    train(run("straight"))
    calls = iter(range(1, 10**6))
    monkeypatch.setattr(train_module.PreemptionFlag, "should_stop", lambda self, engine: next(calls) == 6)
    with pytest.raises(Preempted):
        train(run("stopped"))
    monkeypatch.undo()
    train(run("stopped"))

    def final(name):
        root = tmp_path / name / "checkpoints"
        return root / (root / "latest").read_text().strip()

    state = {}
    for sae in ("j", "jt"):
        a, b = load_file(str(final("straight") / f"{sae}.safetensors")), load_file(str(final("stopped") / f"{sae}.safetensors"))
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{sae}:{key}"
        state[sae] = a
    assert {"sae.log_threshold", "sae.log_coef", "sae.coef_integral", "sae.coef_steps", "sae.width_hint"} <= set(state["j"])
    assert int(state["j"]["sae.coef_steps"]) == 14
    if layout is _skip_transcoder_run:
        from framework.errors import CheckpointError  # noqa: PLC0415
        from framework.export import export_checkpoint  # noqa: PLC0415

        assert all("sae.skip.weight" in state[s] and state[s]["sae.skip.weight"].abs().sum() > 0 for s in state)
        for folder in export_checkpoint(tmp_path / "straight"):  # `sparsemill export` = the live export
            live = load_file(str(tmp_path / "straight" / "export" / folder.name / export.WEIGHTS_FILE))
            again = load_file(str(folder / export.WEIGHTS_FILE))
            assert "W_skip" in again and set(live) == set(again) and all(torch.equal(live[k], again[k]) for k in live)
        with pytest.raises(CheckpointError, match=r"saes\.1\.skip_connection: True -> False"):
            train(load_config(path, [f"run_dir={tmp_path / 'straight'}", "saes.1.skip_connection=false"]))


# ----------------------------------------------------------------------------- SAELens


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("d_out", [None, 12])
def test_saelens_loads_the_export_and_computes_the_same(tmp_path, d_out):
    from sae_lens import SAE  # noqa: PLC0415

    tr = SAETrainer(SAEConfig(name="j", kind="jumprelu", site="a", output_site="b" if d_out else "", n_latents=N, k=4,
                              options={"bandwidth": 0.2}),
                    TrainConfig(warmup_steps=0), "a", "b" if d_out else "a", {"a": D, "b": d_out or D}, 100,
                    torch.device("cpu"), 0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, D, generator=g) * 4 + 2
    y = torch.randn(512, d_out, generator=g) + x[:, :d_out] if d_out else x
    tr.init_from_sample(x, y, True, "geometric_median")
    for _ in range(5):
        tr.step(x, y)
    folder = export.export_sae(tr.sae, tmp_path / "e", "jumprelu", {"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu_transcoder" if d_out else "jumprelu")
    theirs = SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == ("JumpReLUTranscoder" if d_out else "JumpReLUSAE")
    with tr.evaluating() as sae, torch.no_grad():
        xt = torch.randn(256, D, generator=g) * 4 + 2
        # raw-unit pre-activations of the export; keep tokens with no latent near its threshold
        tensors = load_file(str(folder / export.WEIGHTS_FILE))
        pre = ((xt.double() - (0 if d_out else tensors["b_dec"].double())) @ tensors["W_enc"].double()
               + tensors["b_enc"].double())
        clear = ((pre - tensors["threshold"].double()).abs() > 1e-4 * pre.abs().max()).all(1)
        assert clear.float().mean() > 0.9
        xt = xt[clear]
        out = sae(sae.normalize_input(xt))
        mine_codes = torch.zeros(xt.shape[0], N).scatter_add(1, out.indices, out.values) / sae.output_scale
        mine = sae.reconstruct(xt)
        codes = theirs.encode(xt)
        errs = {"encode": _rel_err(codes, mine_codes), "decode": _rel_err(theirs.decode(codes), mine),
                "forward": _rel_err(theirs(xt), mine)}
    print(f"SAELens jumprelu{' transcoder' if d_out else ''} max rel errors:", errs)
    assert max(errs.values()) <= 1e-5, errs
    assert torch.equal(codes != 0, mine_codes != 0)


# ----------------------------------------------------------------------------- data parallel


@pytest.mark.slow
def test_ranks_agree_under_ddp_and_zero(tmp_path):
    """The controller reads the global L0, so every replica holds the same lambda; thresholds and
    W_skip are ordinary parameters (ZeRO-3 partitions and gathers them). 2 ranks stay close to
    1 process (not bitwise: a selection at a threshold may round differently with other shapes)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    worker = Path(__file__).parent / "workers" / "jumprelu_dist_steps.py"
    strategies = ["ddp", "zero2", "zero3"]
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(worker), str(tmp_path), ",".join(strategies)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    for strategy in strategies:
        one = load_file(str(tmp_path / f"{strategy}_w1_r0.safetensors"))
        r0, r1 = (load_file(str(tmp_path / f"{strategy}_w2_r{r}.safetensors")) for r in (0, 1))
        assert set(r0) == set(one) and {"skip.weight", "log_threshold", "log_coef", "coef_integral"} <= set(r0)
        for key in set(r0) - {"width_hint"}:  # the hint: the kernel width the rank's own last batch needed
            assert torch.equal(r0[key], r1[key]), f"{strategy}: ranks disagree on {key}"
        assert int(r0["coef_steps"]) == 8 and r0["skip.weight"].abs().sum() > 0
        for key in ("skip.weight", "decoder_weight", "log_threshold"):
            torch.testing.assert_close(r0[key], one[key], rtol=0.05, atol=0.02, msg=f"{strategy}:{key}")
