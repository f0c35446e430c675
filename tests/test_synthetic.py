"""The synthetic activation generator (statistics, structure, shards) and SAE training on it:
a short run must beat its own initialisation and recover known features."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from framework.activations import FileSource
from framework.config import SAEConfig, TrainConfig, load_config
from framework.evaluate import reconstruction_metrics
from framework.sae_trainer import SAETrainer
from framework.synthetic import SyntheticActivations, SyntheticConfig, feature_recovery, load_ground_truth, max_cosines


def _gen(**kw) -> SyntheticActivations:
    base = dict(d=32, n_features=64, mean_l0=4.0, zipf_exponent=0.7, max_freq=0.3, seed=0)
    base.update(kw)
    return SyntheticActivations(SyntheticConfig(**base))


# --------------------------------------------------------------------------- generator


def test_dictionary_and_stream_are_seeded():
    a, b, c = _gen(seed=1), _gen(seed=1), _gen(seed=2)
    torch.testing.assert_close(a.dictionary.norm(dim=1), torch.ones(64))
    assert torch.equal(a.dictionary, b.dictionary) and not torch.equal(a.dictionary, c.dictionary)
    xa, ca = a.sample(500)
    xb, cb = b.sample(500)
    assert torch.equal(xa, xb) and torch.equal(ca.feature, cb.feature)
    assert not torch.equal(a.sample(500)[0], xa)  # the stream advances
    # an explicit generator gives a reproducible separate stream
    e1 = a.sample(300, torch.Generator().manual_seed(7))[0]
    e2 = c.sample(300, torch.Generator().manual_seed(7))[0]
    assert torch.equal(e1, SyntheticActivations(a.cfg).sample(300, torch.Generator().manual_seed(7))[0])
    assert not torch.equal(e1, e2)


def test_x_is_the_superposition_of_the_codes():
    gen = _gen(offset_norm=3.0, signed_fraction=0.3, n_parents=4)
    x, codes = gen.sample(2000)
    assert x.shape == (2000, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, codes.dense() @ gen.dictionary + gen.offset, atol=1e-5, rtol=1e-5)
    assert gen.offset.norm().item() == pytest.approx(3.0, rel=1e-5)


def test_frequencies_follow_zipf_and_l0_matches():
    gen = _gen(n_features=128, mean_l0=6.0, zipf_exponent=1.0, max_freq=0.4)
    n = 40_000
    _, codes = gen.sample(n)
    p = gen.frequencies.double()
    assert p.sum().item() == pytest.approx(6.0, rel=1e-6)
    assert (p.diff() <= 1e-12).all()  # decreasing with rank
    assert p.max().item() <= 0.4 + 1e-6
    unclipped = p < 0.4 - 1e-6
    ratio = p[unclipped][0] / p[unclipped][-1]  # Zipf-Mandelbrot exponent 1, offset 1
    first, last = int(torch.nonzero(unclipped)[0]), int(torch.nonzero(unclipped)[-1])
    assert ratio.item() == pytest.approx((last + 1) / (first + 1), rel=1e-6)
    emp = codes.firing_counts().double() / n
    z = (emp - p) / (p * (1 - p) / n).sqrt()
    assert z.abs().max().item() < 5.0
    l0 = codes.l0().double()
    assert l0.mean().item() == pytest.approx(6.0, abs=0.05)
    # independent Bernoulli firing: Var(L0) = sum p(1-p)
    assert l0.var().item() == pytest.approx((p * (1 - p)).sum().item(), rel=0.05)


def test_l0_spread_and_fixed_roots():
    spread = _gen(n_features=128, mean_l0=6.0, l0_spread=0.8)
    _, codes = spread.sample(20_000)
    l0 = codes.l0().double()
    p = spread.frequencies.double()
    assert l0.mean().item() == pytest.approx(6.0, rel=0.05)
    assert l0.var().item() > 2.0 * (p * (1 - p)).sum().item()  # over-dispersed
    fixed = _gen(n_features=128, fixed_roots=5)
    _, codes = fixed.sample(3000)
    assert (codes.l0() == 5).all()
    assert (codes.firing_counts()[:10] > codes.firing_counts()[-10:].max()).all()  # still frequency-weighted


@pytest.mark.parametrize("magnitude", ["exponential", "lognormal", "halfnormal", "constant"])
def test_magnitudes_and_signs(magnitude):
    gen = _gen(n_features=64, mean_l0=8.0, magnitude=magnitude, magnitude_mean=2.0, signed_fraction=0.25,
               feature_scale_spread=0.3, zipf_exponent=0.0)
    _, codes = gen.sample(20_000)
    unscaled = codes.coef.abs() / gen.feature_scale[codes.feature]
    assert unscaled.min().item() >= 0
    assert unscaled.mean().item() == pytest.approx(2.0, rel=0.03)
    if magnitude == "constant":
        torch.testing.assert_close(unscaled, torch.full_like(unscaled, 2.0))
    signed = gen.signed[codes.feature]
    assert 8 <= int(gen.signed.sum()) <= 24
    assert (codes.coef[~signed] > 0).all()
    neg = codes.coef[signed] < 0
    assert neg.float().mean().item() == pytest.approx(0.5, abs=0.03)
    for f in torch.nonzero(gen.signed).squeeze(1).tolist():  # every bidirectional feature fires both ways
        c = codes.coef[codes.feature == f]
        assert (c > 0).any() and (c < 0).any()


@pytest.mark.parametrize("exclusive", [True, False])
def test_hierarchy(exclusive):
    P, m = 6, 3
    gen = _gen(n_features=64, mean_l0=6.0, n_parents=P, children_per_parent=m, child_cos=0.6, child_prob=0.6,
               exclusive_children=exclusive)
    cfg = gen.cfg
    R = cfg.n_roots
    assert R == 64 - P * m
    children = torch.arange(R, 64)
    parents = gen.parent_of[children]
    assert (gen.parent_of[:R] == -1).all() and set(parents.tolist()) == set(gen.parents.tolist())
    cos = (gen.dictionary[children] * gen.dictionary[parents]).sum(1)
    torch.testing.assert_close(cos, torch.full_like(cos, 0.6), atol=1e-5, rtol=0)
    n = 30_000
    _, codes = gen.sample(n)
    act = codes.active()
    # a child only fires where its parent fires
    assert not (act[:, children] & ~act[:, parents]).any()
    per_parent = act[:, R:].view(n, P, m).sum(2)
    if exclusive:
        assert per_parent.max().item() == 1
    else:
        assert per_parent.max().item() > 1
    on = act[:, gen.parents]  # [n, P]
    got = (per_parent > 0)[on].float().mean().item()  # P(some child | parent)
    want = 0.6 if exclusive else 1 - 0.4**m
    assert got == pytest.approx(want, abs=0.03)
    emp = act.double().mean(0)
    assert emp.sum().item() == pytest.approx(6.0, rel=0.04)  # mean L0 counts the children
    torch.testing.assert_close(emp[children], gen.frequencies[children].double(), atol=0.01, rtol=0.15)


def test_noise_level():
    gen = _gen(noise_std=0.1, offset_norm=1.0)
    x, codes = gen.sample(20_000)
    resid = x - codes.dense() @ gen.dictionary - gen.offset
    assert resid.std().item() == pytest.approx(0.1, rel=0.02)
    assert resid.mean().abs().item() < 0.003
    assert 0 < gen.noise_fraction() < 0.5


def test_orthogonal_dictionary_and_config_checks():
    gen = _gen(n_features=24, orthogonal=True)
    torch.testing.assert_close(gen.dictionary @ gen.dictionary.T, torch.eye(24), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unreachable"):
        _gen(n_features=10, mean_l0=5.0, max_freq=0.3)
    with pytest.raises(ValueError, match="magnitude"):
        _gen(magnitude="gamma")


def test_feature_recovery_metric():
    gen = _gen(n_features=48)
    D = gen.dictionary
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 32, generator=g)
    perfect = torch.cat([noise, D[torch.randperm(48, generator=g)] * 3.0])  # any row scale
    assert feature_recovery(perfect, D) == pytest.approx((1.0, 1.0), abs=1e-5)
    mean_cos, frac = feature_recovery(noise, D)
    assert mean_cos < 0.8 and frac == 0.0
    half = torch.cat([noise, D[:24]])
    assert feature_recovery(half, D)[1] == pytest.approx(0.5)
    flipped = -D  # AbsTopK latents may point the other way
    assert feature_recovery(flipped, D)[1] == 0.0
    assert feature_recovery(flipped, D, use_abs=True) == pytest.approx((1.0, 1.0), abs=1e-5)
    # slightly rotated rows: cosine 0.95 passes 0.9, fails 0.99
    u = torch.randn(48, 32, generator=g)
    u -= (u * D).sum(1, keepdim=True) * D
    u /= u.norm(dim=1, keepdim=True)
    rotated = 0.95 * D + math.sqrt(1 - 0.95**2) * u
    torch.testing.assert_close(max_cosines(rotated, D), torch.full((48,), 0.95), atol=1e-4, rtol=0)
    assert feature_recovery(rotated, D, threshold=0.9)[1] == 1.0
    assert feature_recovery(rotated, D, threshold=0.99)[1] == 0.0


# --------------------------------------------------------------------------- shards


def test_write_shards_readable_by_file_source(tmp_path):
    gen = _gen(noise_std=0.01, offset_norm=2.0)
    paths = gen.write_shards(tmp_path, n_tokens=2500, shard_rows=1000)
    assert [p.name for p in paths] == ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    assert [load_file(p)["activations"].shape for p in paths] == [(1000, 32), (1000, 32), (500, 32)]
    fresh = SyntheticActivations(gen.cfg)  # same seed, same stream (drawn in the same chunk sizes)
    expected = torch.cat([fresh.sample(n)[0] for n in (1000, 1000, 500)])
    truth = load_ground_truth(tmp_path)
    assert torch.equal(truth["dictionary"], gen.dictionary)
    # the framework's config validation and file source accept the folder
    cfg = load_config(None, ["data.source=activations", f"data.activations_dir={tmp_path}",
                             "saes=[{n_latents: 64, k: 4}]", "eval.tokens=300"])
    src = FileSource(cfg.data, torch.device("cpu"), seed=0, eval_rows=300)
    assert src.dims == {"activations": 32}
    held = torch.cat([b["activations"] for b in src.batches("eval")])
    torch.testing.assert_close(held, expected[-300:])
    train = src.batches("train")
    rows = torch.cat([next(train)["activations"] for _ in range(3)])  # one pass, shuffled chunks
    assert rows.shape == (2200, 32)
    key = lambda t: t.sum(1).sort().values  # noqa: E731
    torch.testing.assert_close(key(rows), key(expected[:2200]))


# --------------------------------------------------------------------------- training


def _train(gen: SyntheticActivations, steps: int, batch: int, n_latents: int, k: int, lr: float, optimizer: str,
           seed: int = 0):
    torch.manual_seed(seed)
    x = gen.sample(steps * batch)[0]
    eval_x = gen.sample(4096, torch.Generator().manual_seed(99))[0]
    cfg = SAEConfig(n_latents=n_latents, k=k, lr=lr, dead_after_tokens=20 * batch)
    tcfg = TrainConfig(total_tokens=steps * batch, batch_size=batch, optimizer=optimizer, warmup_steps=10)
    tr = SAETrainer(cfg, tcfg, "x", "x", {"x": gen.cfg.d}, steps, torch.device("cpu"), seed=seed)
    tr.init_from_sample(x[:4096], x[:4096], True, "geometric_median")

    def fvu():
        return reconstruction_metrics({"s": tr}, [{"x": eval_x}], 4096)["s"].result()["fvu"]

    fvu_init = fvu()
    rec_init = feature_recovery(tr.sae.decoder_weight, gen.dictionary)
    for i in range(steps):
        tr.step(x[i * batch:(i + 1) * batch], x[i * batch:(i + 1) * batch])
    with tr.evaluating() as sae:
        rec = feature_recovery(sae.decoder_weight, gen.dictionary)
    return fvu_init, fvu(), rec_init, rec


@pytest.fixture
def one_thread():
    """These SAEs are tiny: a second OpenMP thread buys nothing, and on a busy 2-core machine
    spinning threads make each step 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("optimizer,lr", [("adam", 4e-3), ("signsgd_schedulefree", 1e-2)])
def test_sae_learns_synthetic_features(optimizer, lr, one_thread):
    gen = SyntheticActivations(SyntheticConfig(d=32, n_features=64, mean_l0=3.0, zipf_exponent=0.5, max_freq=0.3,
                                               noise_std=0.02, offset_norm=1.0, seed=0))
    fvu_init, fvu, rec_init, rec = _train(gen, steps=250, batch=256, n_latents=256, k=4, lr=lr, optimizer=optimizer)
    assert fvu_init > 0.5  # random tied init explains little
    assert fvu < 0.2 and fvu < 0.35 * fvu_init, (fvu_init, fvu)
    assert rec_init[1] == 0.0  # no feature is matched by chance at init ...
    assert rec[1] >= 0.6 and rec[0] > 0.9, rec  # ... most are after training
