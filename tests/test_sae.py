"""SAE math: sparse backward vs dense autograd in the real module, AuxK, decoder-norm
constraint, initialisation, and export -> reload -> identical reconstructions."""

import pytest
import torch

from framework import export
from framework.config import SAEConfig, TrainConfig
from framework.kinds import build_sae
from framework.sae import TopKSAE, geometric_median
from framework.sae_trainer import SAETrainer, annealed_k


def _trainer(d=8, n=32, k=4, d_out=None, **sae_kw):
    cfg = SAEConfig(name="s", site="a", output_site="b" if d_out else "", n_latents=n, k=k, **sae_kw)
    dims = {"a": d, "b": d_out or d}
    return SAETrainer(cfg, TrainConfig(warmup_steps=0), "a", "b" if d_out else "a", dims, 100, torch.device("cpu"), 0)


def test_module_gradients_match_dense_autograd():
    torch.manual_seed(0)
    sae = build_sae("topk", 6, 20, 3).double()
    with torch.no_grad():
        sae.encoder_bias.normal_()
        sae.b_dec.normal_()
    x = torch.randn(9, 6, dtype=torch.float64)
    out = sae(x)
    loss = (out.x_hat - x).pow(2).sum()
    loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.encoder_weight.T + sae.encoder_bias
    vals, idx = pre.topk(3, dim=1)
    dense_codes = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    dense_hat = dense_codes @ sae.decoder_weight + sae.b_dec
    (dense_hat - x).pow(2).sum().backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[n], p.grad, msg=n)


def test_decoder_projection_and_renorm_keep_unit_rows():
    tr = _trainer()
    x = torch.randn(64, 8)
    tr.init_from_sample(x, x, True, "mean")
    tr.step(x, x)
    norms = tr.sae.decoder_weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    sae = tr.sae
    loss = tr.runner.objective(x, x, 4, None)[0]
    loss.backward()  # the objective's gradient hook removes each row's radial component
    radial = (sae.decoder_weight.grad * sae.decoder_weight).sum(1)
    assert radial.abs().max() < 1e-6 < sae.decoder_weight.grad.abs().max()


def test_auxk_trains_only_dead_latents_and_is_zero_without_dead():
    tr = _trainer(n=64, k=1, aux_k=4, dead_after_tokens=1, lr=1e-4)
    x = torch.randn(16, 8)
    tr.init_from_sample(x, x, True, "mean")
    m0 = tr.step(x, x)
    assert m0.aux_loss.item() == 0.0  # nothing can be dead before the first step
    dead = tr.dead_mask()
    assert dead.any() and not dead.all()
    before = tr.sae.encoder_weight.detach().clone()
    m1 = tr.step(x, x)
    assert m1.aux_loss.item() > 0
    # with AuxK, dead latents' encoder rows receive gradient and move
    assert not torch.equal(before[dead], tr.sae.encoder_weight.detach()[dead])
    # without it they cannot (they are selected by nobody)
    tr2 = _trainer(n=64, k=1, aux_k=4, aux_coef=0.0, dead_after_tokens=1, lr=1e-4)
    tr2.init_from_sample(x, x, True, "mean")
    tr2.step(x, x)
    dead2 = tr2.dead_mask()
    grads = []
    tr2.sae.encoder_weight.register_hook(lambda g: grads.append(g.clone()))
    tr2.step(x, x)
    assert dead2.any() and grads[0][dead2].abs().max() == 0


def test_k_annealing_schedule():
    cfg = SAEConfig(k=8, k_anneal_start=64, k_anneal_fraction=0.5)
    ks = [annealed_k(cfg, s, 100) for s in range(100)]
    assert ks[0] == 64 and ks[50] == 8 and ks[-1] == 8 and all(a >= b for a, b in zip(ks, ks[1:]))


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    med = geometric_median(pts)
    assert med.norm() < 1.0 < pts.mean(0).norm()


@pytest.mark.parametrize("kind,d_out", [("topk", None), ("abstopk", None), ("topk", 5)])
def test_export_reload_reconstructs_identically(tmp_path, kind, d_out):
    torch.manual_seed(1)
    tr = _trainer(d=8, n=32, k=4, d_out=d_out, kind=kind)
    x = torch.randn(256, 8) * 7 + 3
    y = torch.randn(256, d_out) * 0.3 if d_out else x
    tr.init_from_sample(x, y, True, "geometric_median")
    with torch.no_grad():  # powers of two: folding them into the weights is exact (no near-tie can flip)
        for scale in (tr.sae.input_scale, tr.sae.output_scale):
            scale.copy_(2.0 ** torch.round(torch.log2(scale)))
    for _ in range(5):
        tr.step(x, y)
    folder = export.export_sae(tr.sae, tmp_path / "e", kind, {"hook_name": "blocks.0.hook_resid_post"})
    loaded = export.load_exported(folder)
    assert isinstance(loaded, TopKSAE) and loaded.is_transcoder == bool(d_out)
    torch.testing.assert_close(loaded.reconstruct(x), tr.sae.reconstruct(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded.decoder_weight.norm(dim=1), torch.ones(32))
    import json
    cfg = json.loads((folder / "cfg.json").read_text())
    want = "topk_transcoder" if d_out else kind  # SAELens has no TopK transcoder; AbsTopK is its `abstopk`
    assert cfg["architecture"] == want and cfg["d_sae"] == 32 and cfg["apply_b_dec_to_input"] == (d_out is None)


def test_load_exported_rejects_extra_tensors(tmp_path):
    from safetensors.torch import save_file

    tr = _trainer()
    folder = export.export_sae(tr.sae, tmp_path / "e", "topk", {})
    tensors = export.folded_tensors(tr.sae)
    tensors["evil"] = torch.zeros(1)
    save_file(tensors, str(folder / export.WEIGHTS_FILE))
    with pytest.raises(ValueError, match="expected"):
        export.load_exported(folder)


@pytest.mark.parametrize("kind", ["topk", "abstopk"])
def test_auxk_selected_in_the_encode_equals_auxk_encoded_apart(kind):
    """TopK's training forward makes AuxK's selection in its own encode (batch.aux_request; on
    CPU the fused selection's tiles): AuxK's loss and every gradient equal those of encoding the
    dead latents' rows apart (`encode_rows`), as latent shards still do."""
    from _selection import topk_margin  # noqa: PLC0415
    from framework.losses import AuxRequest, TrainingBatch, aux_k_loss  # noqa: PLC0415

    torch.manual_seed(3)
    sae = build_sae(kind, 16, 200, 4)
    with torch.no_grad():
        sae.encoder_bias.normal_(std=0.1)
    x = torch.randn(32, 16)
    dead = torch.arange(0, 200, 3)
    pre = (x - sae.b_dec).double() @ sae.encoder_weight.double().T + sae.encoder_bias.double()
    assert topk_margin(pre[:, dead].abs() if kind == "abstopk" else pre[:, dead], 8) > 1e-5  # no float32 flips
    results = []
    for together in (True, False):
        sae.zero_grad()
        batch = TrainingBatch(target=x, aux_request=AuxRequest(dead, 8))
        out = sae(x, batch=batch)
        assert out.aux_selection is not None
        aux = aux_k_loss(sae, x, (x - out.x_hat).detach(), dead, 8, batch, out.aux_selection if together else None)
        (batch.normalized_mse(out.x_hat) + aux).backward()
        results.append([aux.detach()] + [p.grad.clone() for p in sae.parameters()])
    assert results[0][0] > 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
