"""SAE variants (framework/variants): each selection rule and its gradients against a plain
dense reimplementation (float64), training-vs-inference behaviour, export -> load_exported ->
identical reconstructions, options validation, and the LM-gradient helper of g-SAE."""

import json
import math

import pytest
import torch

import framework.kinds  # noqa: F401  (registers the kinds)
from framework import export
from framework.config import ConfigError, SAEConfig, TrainConfig, load_config
from framework.kinds import SAE_KINDS, build_sae
from framework.losses import TrainingBatch, normalized_mse
from framework.sae_trainer import SAETrainer
from framework.variants import common
from framework.lm_grads import lm_activation_grads
from framework.variants.topafa import afa_counts
from framework.variants.vtopk import gaussian_kl

D, N, K, B = 6, 24, 3, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(kind, d=D, n=N, k=K, d_out=None, **options):
    torch.manual_seed(0)
    sae = build_sae(kind, d, n, k, d_out=d_out, options=options).double()
    with torch.no_grad():
        sae.encoder_bias.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def _x(b=B, d=D, seed=1):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pre(sae, x):
    return (x - sae.input_offset()) @ sae.encoder_weight.T + sae.encoder_bias


def _assert_threshold_codes(codes, pre, theta, eps=1e-9):
    """codes == where(pre > theta, pre, 0) away from ties: an entry may disagree only if its
    pre-activation lies within eps of its threshold (a learned threshold is often exactly a
    selected value, and two computation paths round pre differently)."""
    expected = torch.where(pre > theta, pre, torch.zeros_like(pre)).detach()
    differ = (codes - expected).abs() > 1e-12
    assert ((pre.detach() - theta).abs()[differ] < eps).all(), (pre.detach() - theta).abs()[differ]
    torch.testing.assert_close(codes[~differ], expected[~differ])


def _dense(values, indices, n=N):
    """Dense [B, n] codes from a padded sparse layout (duplicates summed)."""
    return torch.zeros(values.shape[0], n, dtype=values.dtype).scatter_add(1, indices, values)


def _grads(sae, loss):
    sae.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


def _compare_grads(sae, sparse_loss_fn, dense_loss_fn):
    g1 = _grads(sae, sparse_loss_fn())
    g2 = _grads(sae, dense_loss_fn())
    assert set(g1) == set(g2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)


def _loss(sae, out, x):
    return (out.x_hat - x.sin()).pow(2).sum()


def _dense_loss(sae, codes, x):
    return (codes @ sae.decoder_weight + sae.b_dec - x.sin()).pow(2).sum()


# ----------------------------------------------------------------------------- BatchTopK / Mutual Choice


def _dense_batchtopk(pre, k):
    flat = pre.relu().reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k * pre.shape[0]).indices] = True
    return torch.where(keep.view_as(pre), pre.relu(), torch.zeros_like(pre))


@pytest.mark.parametrize("kind", ["batchtopk", "mutual_choice"])
def test_batchtopk_selection_and_gradients_match_dense(kind):
    sae = _sae(kind, candidate_factor=1)  # start with k candidates: the widening path is exercised
    x = _x()
    x[0] *= 8  # one token takes far more than k latents of the batch budget
    out = sae(x)
    dense = _dense_batchtopk(_pre(sae, x), K)
    torch.testing.assert_close(_dense(out.values, out.indices), dense.detach())
    assert (out.values != 0).sum(1)[0] > K  # variable allocation really happened
    assert (out.values != 0).sum() == K * B
    _compare_grads(sae, lambda: _loss(sae, sae(x), x), lambda: _dense_loss(sae, _dense_batchtopk(_pre(sae, x), K), x))


def test_batchtopk_threshold_is_learned_in_training_and_used_at_inference():
    sae = _sae("batchtopk", threshold_beta=0.5)
    x = _x(40)
    sae.eval()
    before = sae(x)  # no threshold yet: per-token TopK
    assert ((before.values != 0).sum(1) <= K).all()
    sae.train()
    out1 = sae(x)
    sae.after_step(out1)
    first_min = out1.values[out1.values > 0].min()
    torch.testing.assert_close(sae.running.threshold(), first_min)
    out2 = sae(x[:20])
    sae.after_step(out2)
    second_min = out2.values[out2.values > 0].min()  # bias-corrected EMA: (0.25 a + 0.5 b) / 0.75
    torch.testing.assert_close(sae.running.threshold(), first_min / 3 + 2 * second_min / 3)
    sae.eval()
    theta = sae.running.threshold()
    out = sae(x)
    _assert_threshold_codes(_dense(out.values, out.indices), _pre(sae, x), theta)
    l0 = (out.values != 0).sum(1)
    assert l0.min() != l0.max()  # inference L0 varies per token


def test_threshold_select_per_latent_and_widening():
    sae = _sae("feature_choice")
    x = _x(30)
    theta = torch.rand(N, dtype=torch.float64) * 0.2
    theta[:3] = 0.0
    v, i = common.threshold_select(x, sae.encoder_weight, sae.encoder_bias, sae.input_offset(), theta, 1)
    _assert_threshold_codes(_dense(v, i), _pre(sae, x), theta)


# ----------------------------------------------------------------------------- Feature Choice


def _dense_feature_choice(pre, m):
    rel = pre.relu()
    keep = torch.zeros_like(rel, dtype=torch.bool)
    for j in range(rel.shape[1]):
        keep[rel[:, j].topk(int(m[j]) if torch.is_tensor(m) else m).indices, j] = True
    return torch.where(keep, rel, torch.zeros_like(rel))


def test_feature_choice_selection_and_gradients_match_dense():
    sae = _sae("feature_choice")
    x = _x(16)
    m = math.ceil(K * 16 / N)  # the default capacity
    out = sae(x)
    torch.testing.assert_close(_dense(out.values, out.indices), _dense_feature_choice(_pre(sae, x), m).detach())
    assert torch.bincount(out.indices[out.values != 0], minlength=N).max() <= m  # at most m tokens per latent
    _compare_grads(sae, lambda: _loss(sae, sae(x), x),
                   lambda: _dense_loss(sae, _dense_feature_choice(_pre(sae, x), m), x))


def test_feature_choice_zipf_capacities_and_per_latent_thresholds():
    sae = _sae("feature_choice", capacity="zipf", m=3)
    x = _x(16)
    sae.after_step(sae(x))  # densities exist now: Zipf capacities by density rank
    caps = sae.capacities(K, 16)
    assert torch.is_tensor(caps) and caps.max() > caps.min() and caps.min() >= 1
    out = sae(x)
    torch.testing.assert_close(_dense(out.values, out.indices), _dense_feature_choice(_pre(sae, x), caps).detach())
    sae.after_step(out)
    sae.eval()
    theta = sae.running.threshold()
    assert theta.shape == (N,)
    ev = sae(x)
    _assert_threshold_codes(_dense(ev.values, ev.indices), _pre(sae, x), theta)


def test_zipf_underused_and_aux_zipf_trains_underused_latents():
    density = torch.tensor([0.3, 0.15, 0.1, 0.075, 0.06, 0.05, 0.0001, 0.0], dtype=torch.float64)
    under = common.zipf_underused(density, 0.1)
    assert under.tolist() == [False] * 6 + [True, True]
    sae = _sae("mutual_choice", aux_zipf_coef=1.0, zipf_fraction=0.5)
    x = _x(16)
    with torch.no_grad():
        sae.density.ema.copy_(torch.linspace(0.5, 0.0, N, dtype=torch.float64) ** 3)
        sae.density.steps.fill_(100)
    out = sae(x)
    assert "aux_zipf" in out.losses and out.losses["aux_zipf"] > 0
    ids = common.zipf_underused(sae.density.density(), 0.5)
    sae.zero_grad()
    out.losses["aux_zipf"].backward()
    moved = sae.encoder_weight.grad.abs().sum(1) > 0
    assert moved.any() and not moved[~ids].any()  # only under-used latents' encoder rows get gradient


# ----------------------------------------------------------------------------- top-AFA


def _dense_topafa(sae, x):
    pre = _pre(sae, x).relu()
    vals, order = pre.sort(1, descending=True)
    counts = afa_counts(vals.detach(), sae.decoder_weight.norm(dim=1)[order].detach(),
                        (x - sae.b_dec).norm(dim=1).detach())
    keep_sorted = torch.arange(N) < counts[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return torch.where(keep, pre, torch.zeros_like(pre))


def test_topafa_norm_matching_rule_and_gradients_match_dense():
    sae = _sae("topafa", max_k=N)
    x = _x(12)
    x[:4] *= 3  # larger norms: more latents to match
    out = sae(x)
    torch.testing.assert_close(_dense(out.values, out.indices), _dense_topafa(sae, x).detach())
    l0 = (out.values != 0).sum(1)
    assert l0.max() > l0.min()
    # the rule: the kept code's norm is the closest prefix norm to ||x - b_dec||
    code_norm = out.values.norm(dim=1)
    target = (x - sae.b_dec).norm(dim=1)
    pre_sorted = _pre(sae, x).relu().sort(1, descending=True).values
    prefix_norms = pre_sorted.pow(2).cumsum(1).sqrt()
    best = (prefix_norms - target[:, None]).abs().min(1).values
    torch.testing.assert_close((code_norm - target).abs(), best.detach())
    _compare_grads(sae, lambda: _loss(sae, sae(x), x), lambda: _dense_loss(sae, _dense_topafa(sae, x), x))


def test_topafa_afa_loss_and_width_cap():
    sae = _sae("topafa", max_k=2, afa_coef=0.5)
    out = sae(_x())
    assert out.values.shape[1] <= 2 and "afa" in out.losses and out.losses["afa"] > 0


# ----------------------------------------------------------------------------- g-SAE


def _dense_gsae(sae, x, g, beta):
    pre = _pre(sae, x)
    gn = g / g.pow(2).sum(1).mean().sqrt()
    score = pre.relu() * (1 + beta * (gn @ sae.decoder_weight.T).abs())
    idx = score.detach().topk(K, dim=1).indices
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, idx, True)
    return torch.where(keep, pre.relu(), torch.zeros_like(pre))


def test_gsae_selection_and_gradients_match_dense():
    sae = _sae("gsae", beta=4.0, latent_chunk=5)  # several tiles: the running top-k merge is exercised
    x = _x()
    g = _x(seed=7) * 3
    out = sae(x, batch=TrainingBatch(x, g))
    torch.testing.assert_close(_dense(out.values, out.indices), _dense_gsae(sae, x, g, 4.0).detach())
    plain = build_sae("topk", D, N, K).double()
    plain.load_state_dict(sae.state_dict(), strict=False)
    assert not torch.equal(_dense(out.values, out.indices), _dense(*plain.encode(x)))  # the gradient changed choices
    _compare_grads(sae, lambda: _loss(sae, sae(x, batch=TrainingBatch(x, g)), x),
                   lambda: _dense_loss(sae, _dense_gsae(sae, x, g, 4.0), x))


def test_gsae_gradient_comes_with_the_training_batch_only():
    """The gradient reaches the forward as an argument (no state kept between calls): with
    it the training selection is tilted, without it (or at inference) it is plain TopK."""
    sae = _sae("gsae", beta=4.0)
    x, g = _x(), _x(seed=7)
    with_grad = sae(x, batch=TrainingBatch(x, g))
    assert not torch.equal(_dense(with_grad.values, with_grad.indices), _dense(*sae.encode(x)))
    torch.testing.assert_close(sae(x, batch=TrainingBatch(x, g)).values, with_grad.values)
    plain = sae(x)
    torch.testing.assert_close(_dense(plain.values, plain.indices), _dense(*sae.encode(x)))
    sae.eval()
    at_inference = sae(x, batch=TrainingBatch(x, g))
    torch.testing.assert_close(_dense(at_inference.values, at_inference.indices), _dense(*sae.encode(x)))


def test_lm_activation_grads_is_the_loss_gradient():
    from framework import hooks
    from framework.config import ModelConfig
    from framework.llm import load_frozen

    model, _ = load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"))
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    site = "blocks.0.resid_post"
    acts, grads, loss = lm_activation_grads(model, ids, site)
    assert acts.shape == grads.shape and grads.abs().sum() > 0
    assert grads[:, -1].abs().max() == 0  # the last position predicts nothing in the loss
    assert all(p.grad is None for p in model.parameters())

    def loss_with(delta):
        with torch.no_grad(), hooks.splice(model, hooks.parse_site(site), lambda a: a + delta):
            logits = model(input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten(),
                                                 reduction="sum")

    eps = 1e-2
    direction = grads / grads.norm()
    numeric = (loss_with(eps * direction) - loss_with(-eps * direction)) / (2 * eps)
    torch.testing.assert_close(numeric.float(), grads.norm(), rtol=2e-2, atol=1e-3)


# ----------------------------------------------------------------------------- MP-SAE


def _dense_mp(sae, x, steps):
    r = x - sae.b_dec
    codes = torch.zeros(x.shape[0], N, dtype=x.dtype)
    for _ in range(steps):
        corr = r @ sae.decoder_weight.T
        v, j = corr.relu().max(1)
        codes = codes + torch.zeros_like(codes).scatter(1, j[:, None], v[:, None])
        r = r - v[:, None] * sae.decoder_weight[j]
    return codes


def test_mpsae_pursuit_and_gradients_match_dense():
    sae = _sae("mpsae", k=4)
    with torch.no_grad():
        sae.decoder_weight.copy_(torch.nn.functional.normalize(sae.decoder_weight, dim=1))
    x = _x()
    out = sae(x)
    torch.testing.assert_close(_dense(out.values, out.indices), _dense_mp(sae, x, 4).detach())
    # matching pursuit: the residual is orthogonal to the atom just subtracted
    _, first, r = sae.pursuit(x, 1)
    j = first[:, 0]
    torch.testing.assert_close((r * sae.decoder_weight[j]).sum(1), torch.zeros(B, dtype=torch.float64))
    _compare_grads(sae, lambda: _loss(sae, sae(x), x), lambda: _dense_loss(sae, _dense_mp(sae, x, 4), x))


def test_mpsae_counts_a_latent_picked_twice_once():
    """Matching pursuit may pick an atom again; it is one active latent with the summed
    coefficient (L0 and the firing counters count it once), and the reconstruction is kept."""
    sae = _sae("mpsae", n=4, k=6)
    with torch.no_grad():  # 4 atoms for d=6: residuals keep correlating with atoms already used
        sae.decoder_weight.copy_(torch.nn.functional.normalize(sae.decoder_weight, dim=1))
    x = _x(32)
    values, indices, residual = sae.pursuit(x, 6)
    repeats = [len(set(row.tolist())) < 6 for row in indices]
    assert any(repeats)
    out = sae(x)
    active = [set(i[v != 0].tolist()) for v, i in zip(out.values, out.indices)]
    assert [int((v != 0).sum()) for v in out.values] == [len(a) for a in active]  # no latent twice in a row
    torch.testing.assert_close(_dense(out.values, out.indices, n=4), _dense(values, indices, n=4))
    torch.testing.assert_close(out.x_hat, x - residual)


def test_mpsae_adaptive_stopping_at_inference():
    sae = _sae("mpsae", k=4, stop_residual=0.5, max_inference_steps=12)
    x = _x(64)
    sae.eval()
    out = sae(x)
    l0 = (out.values != 0).sum(1)
    assert l0.min() < l0.max()
    values, _, residual = sae.pursuit(x, 12, 0.5)  # the steps each token took before it stopped
    stopped = (values != 0).sum(1) < values.shape[1]
    assert stopped.any() and not stopped.all()
    assert (residual.norm(dim=1)[stopped] <= 0.5 * (x - sae.b_dec).norm(dim=1)[stopped] + 1e-9).all()
    torch.testing.assert_close(out.x_hat, x - residual)
    sae_no_stop = _sae("mpsae", k=4)
    sae_no_stop.eval()
    torch.testing.assert_close(sae_no_stop(x).values, _sae("mpsae", k=4)(x).values)  # inference = training steps
    with pytest.raises(ConfigError, match="transcoder"):
        build_sae("mpsae", 4, 8, 2, d_out=3)
    with pytest.raises(ConfigError, match="transcoder"):
        build_sae("topafa", 4, 8, 2, d_out=3)


# ----------------------------------------------------------------------------- Matryoshka


@pytest.mark.parametrize("selection", ["topk", "batchtopk"])
def test_matryoshka_prefix_losses_match_dense(selection):
    sae = _sae("matryoshka", prefixes=[4, 12], selection=selection)
    x = _x()
    out = sae(x)
    codes = _dense(out.values, out.indices)
    pre = _pre(sae, x)
    expected = (_dense_batchtopk(pre, K) if selection == "batchtopk"
                else torch.zeros_like(pre).scatter(1, pre.topk(K, 1).indices, pre.topk(K, 1).values.relu()))
    torch.testing.assert_close(codes, expected.detach())

    def fvu(c):
        return (c @ sae.decoder_weight + sae.b_dec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()

    dense_terms = sum(fvu(torch.where(torch.arange(N) < m, codes, torch.zeros_like(codes))) for m in (4, 12))
    torch.testing.assert_close(out.losses["matryoshka"], dense_terms)
    assert sae.export_architecture == ("topk" if selection == "topk" else "jumprelu")
    assert sae.prefix_sizes == [4, 12, N]


def test_matryoshka_transcoder_uses_the_target_not_the_input():
    tr = _trainer("matryoshka", d_out=5, options={"prefixes": [4]})
    x, y = torch.randn(64, D), torch.randn(64, 5) * 3
    tr.init_from_sample(x, y, True, "mean")
    xn, yn = tr.sae.normalize_input(x), tr.sae.normalize_target(y)  # what the step does
    out = tr.sae(xn, batch=TrainingBatch(yn))
    prefix = tr.sae.prefix_reconstruction(out.values, out.indices, 4)
    torch.testing.assert_close(out.losses["matryoshka"], normalized_mse(prefix, yn))
    with pytest.raises(ValueError, match="target"):
        tr.sae(xn)  # a transcoder's prefix losses need its target: no batch, no target
    tr.step(x, y)  # the real step hands it over


# ----------------------------------------------------------------------------- vtopk


def test_vtopk_noise_kl_and_inference():
    sae = _sae("vtopk", sigma_init=1e-9, kl_coef=0.0)
    x = _x()
    train_out = sae(x)  # negligible noise: the TopK codes
    torch.testing.assert_close(_dense(train_out.values, train_out.indices), _dense(*sae.encode(x)))
    noisy = _sae("vtopk", sigma_init=0.5, kl_coef=1.0)
    a, b = noisy(x), noisy(x)
    assert not torch.equal(_dense(a.values, a.indices), _dense(b.values, b.indices))  # sampled
    assert a.losses["kl"] > 0
    _grads(noisy, a.x_hat.sum() + a.losses["kl"])
    assert noisy.log_sigma.grad.abs().sum() > 0
    noisy.eval()
    torch.testing.assert_close(_dense(noisy(x).values, noisy(x).indices), _dense(*noisy.encode(x)))
    mu, ls = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64) * 0.3
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, ls.exp()), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mu, ls), ref)


# ----------------------------------------------------------------------------- export / trainer


def _trainer(kind, d=D, n=N, k=K, d_out=None, options=None, **kw):
    kw.setdefault("lr", 1e-3)  # fixed: the default's 1/sqrt(n) scaling is huge at these tiny widths
    cfg = SAEConfig(name="s", kind=kind, site="a", output_site="b" if d_out else "", n_latents=n, k=k,
                    options=options or {}, dead_after_tokens=64, **kw)
    dims = {"a": d, "b": d_out or d}
    return SAETrainer(cfg, TrainConfig(warmup_steps=0), "a", "b" if d_out else "a", dims, 100, torch.device("cpu"), 0)


EXPORT_CASES = [
    ("batchtopk", None, {}, "jumprelu"), ("batchtopk", 5, {}, "jumprelu_transcoder"),
    ("mutual_choice", None, {"aux_zipf_coef": 0.1}, "jumprelu"), ("feature_choice", None, {}, "jumprelu"),
    ("feature_choice", 5, {"capacity": "zipf"}, "jumprelu_transcoder"), ("topafa", None, {}, "top_afa"),
    ("gsae", None, {}, "topk"), ("gsae", 5, {}, "topk_transcoder"), ("mpsae", None, {"stop_residual": 0.3}, "matching_pursuit"),
    ("matryoshka", None, {"selection": "batchtopk"}, "jumprelu"), ("matryoshka", 5, {}, "topk_transcoder"),
    ("vtopk", None, {}, "topk"), ("vtopk", 5, {}, "topk_transcoder"),
]


@pytest.mark.parametrize("kind,d_out,options,arch", EXPORT_CASES)
def test_export_reload_reconstructs_identically(tmp_path, kind, d_out, options, arch):
    torch.manual_seed(3)
    tr = _trainer(kind, d=8, n=32, k=4, d_out=d_out, options=options)
    x = torch.randn(256, 8) * 5 + 2
    y = torch.randn(256, d_out) * 0.3 + x[:, :d_out] if d_out else x
    tr.init_from_sample(x, y, True, "geometric_median")
    # Powers of two: folding the scales into the weights is then exact, so the export selects
    # exactly what we select (other scales round at 1 ulp and may flip a near-tie, on some CPUs)
    with torch.no_grad():
        for scale in (tr.sae.input_scale, tr.sae.output_scale):
            scale.copy_(2.0 ** torch.round(torch.log2(scale)))
    for step in range(6):
        tr.step(x, y, torch.randn(256, d_out or 8) if tr.sae.needs_lm_grad else None)
    folder = export.export_sae(tr.sae, tmp_path / "e", kind, {})
    loaded = export.load_exported(folder)
    assert type(loaded) is type(tr.sae)
    with tr.evaluating() as sae:
        mine = sae.reconstruct(x)
    torch.testing.assert_close(loaded.eval().reconstruct(x), mine, rtol=1e-4, atol=1e-4)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["sparsemill_kind"] == kind
    from safetensors.torch import load_file
    tensors = load_file(str(folder / export.WEIGHTS_FILE))
    assert ("threshold" in tensors) == arch.startswith("jumprelu")
    if arch.startswith("jumprelu"):
        assert tensors["threshold"].shape == (32,)
        if kind == "batchtopk":  # raw units: folded by output_scale
            torch.testing.assert_close(tensors["threshold"][0], (tr.sae.running.threshold() / tr.sae.output_scale).float())


@pytest.mark.parametrize("kind", sorted(k for k in SAE_KINDS if not SAE_KINDS[k].cross_layer))  # clt: tests/test_clt.py
def test_trainer_step_runs_for_every_kind_and_reports_its_l0(kind):
    """Every registered kind (a new one cannot escape: the list is the registry) trains, keeps
    unit-norm decoder rows, and reports L0 = the batch's mean number of distinct active latents."""
    tr = _trainer(kind, n=32, k=4)
    x = torch.randn(128, D, generator=torch.Generator().manual_seed(5))
    tr.init_from_sample(x, x, True, "mean")
    steps = []
    for _ in range(3):
        steps.append(m := tr.step(x, x, torch.randn(128, D) if tr.sae.needs_lm_grad else None))
    assert math.isfinite(m.loss.item())
    norms = tr.sae.decoder_weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    xn = tr.sae.normalize_input(x)
    lm_grad = tr.sae.normalize_lm_grad(torch.randn(128, D)) if tr.sae.needs_lm_grad else None
    out = tr.sae(xn, batch=TrainingBatch(xn, lm_grad))  # the training forward of the next step
    per_token = torch.tensor([len(set(i[v != 0].tolist())) for v, i in zip(out.values, out.indices)])
    assert 0 < m.l0.item() <= out.values.shape[1] and per_token.float().mean().item() > 0
    if tr.sae.variable_l0:  # a capability the kind declares
        assert per_token.min() < per_token.max()
    else:
        assert per_token.max() <= 4
    logged = tr.read_sums()["l0"]  # the logged L0 is the mean of the steps' L0
    assert logged == pytest.approx(sum(s.l0.item() for s in steps) / 3, rel=1e-6)


# ----------------------------------------------------------------------------- options


def test_options_validation():
    with pytest.raises(ConfigError, match="did you mean 'threshold_beta'"):
        build_sae("batchtopk", 4, 8, 2, options={"threshold_bta": 0.9})
    with pytest.raises(ConfigError, match="options.selection"):
        build_sae("matryoshka", 4, 8, 2, options={"selection": "batch"})
    with pytest.raises(ConfigError, match="increasing"):
        build_sae("matryoshka", 4, 64, 2, options={"prefixes": [16, 8]})
    with pytest.raises(ConfigError, match="n_latents"):
        build_sae("matryoshka", 4, 8, 2, options={"prefixes": [4, 8]})
    with pytest.raises(ConfigError, match="capacity"):
        build_sae("feature_choice", 4, 8, 2, options={"capacity": "zipfian"})
    with pytest.raises(ConfigError, match="expected float"):
        build_sae("vtopk", 4, 8, 2, options={"kl_coef": "big"})
    with pytest.raises(ConfigError, match="stop_residual"):
        build_sae("mpsae", 4, 8, 2, options={"stop_residual": 1.5})
    assert build_sae("feature_choice", 4, 8, 2, options={"m": 3, "aux_zipf_coef": 1}).options.aux_zipf_coef == 1.0


def test_yaml_config_validates_variant_options(tmp_path):
    (tmp_path / "acts").mkdir()
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{source: activations, activations_dir: '{tmp_path / 'acts'}'}}\n"
                    "saes:\n  - {kind: feature_choice, options: {m: 4}}\n")
    cfg = load_config(path)
    assert cfg.saes[0].options == {"m": 4}
    with pytest.raises(ConfigError, match=r"saes\.0\.options\.mm.*did you mean 'm'"):
        load_config(path, ["saes.0.options.mm=4"])
    with pytest.raises(ConfigError, match=r"saes\.0\.kind.*did you mean 'feature_choice'"):
        load_config(path, ["saes.0.kind=feature_choise"])
