"""Skip transcoders: any transcoder kind plus a jointly trained linear skip x @ W_skip^T. The
output is the kind's plus the skip, every kind's own loss terms see it, training moves it (and
the decoder-norm constraint leaves it alone), it is checkpointed and exported folded into raw
units (SAELens `jumprelu_skip_transcoder`; TopK + skip under a name SAELens refuses), the eval
reports what the skip alone explains, and a skip on an SAE is a clear config error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from framework import export
from framework.config import ConfigError, SAEConfig, TrainConfig, load_config
from framework.evaluate import reconstruction_metrics
from framework.kinds import SAE_KINDS, build_sae
from framework.sae_trainer import SAETrainer

D, D_OUT, N, K = 12, 10, 48, 4
TRANSCODER_KINDS = sorted(k for k in SAE_KINDS if SAE_KINDS[k].supports_transcoder
                          and not SAE_KINDS[k].cross_layer)  # a CLT refuses skip connections (tests/test_clt.py)
OPTIONS = {"matryoshka": {"prefixes": [8]}, "mutual_choice": {"aux_zipf_coef": 0.1}}


def _data(n=512, seed=0):
    """y = a linear map of x plus a sparse part: what a skip transcoder is built for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * 2 + 1
    A = torch.randn(D_OUT, D, generator=g) * 0.5
    codes = (torch.rand(n, 32, generator=g) < 0.1) * torch.rand(n, 32, generator=g) * 3
    y = x @ A.T + codes @ torch.randn(32, D_OUT, generator=g)
    return x, y


def _trainer(kind, skip=True, **kw):
    cfg = SAEConfig(name="t", kind=kind, site="a", output_site="b", n_latents=N, k=K, options=OPTIONS.get(kind, {}),
                    skip_connection=skip, dead_after_tokens=128, **kw)
    return SAETrainer(cfg, TrainConfig(warmup_steps=0), "a", "b", {"a": D, "b": D_OUT}, 100, torch.device("cpu"), 0)


def test_every_transcoder_kind_gets_one():
    assert {"topk", "batchtopk", "jumprelu", "matryoshka", "gsae", "vtopk"} <= set(TRANSCODER_KINDS)
    assert "mpsae" not in TRANSCODER_KINDS and "topafa" not in TRANSCODER_KINDS


@pytest.mark.parametrize("kind", TRANSCODER_KINDS)
def test_output_is_the_kinds_plus_the_skip(kind):
    plain = build_sae(kind, D, N, K, d_out=D_OUT, seed=3, options=OPTIONS.get(kind, {})).eval()
    skip = build_sae(kind, D, N, K, d_out=D_OUT, seed=3, options=OPTIONS.get(kind, {}), skip_connection=True).eval()
    assert skip.has_skip and not plain.has_skip and type(skip).__name__ == "Skip" + type(plain).__name__
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["skip.weight"] and not unexpected
    torch.testing.assert_close(skip.skip.weight, torch.zeros(D_OUT, D))  # starts as the plain transcoder
    with torch.no_grad():
        skip.skip.weight.normal_()
    x = torch.randn(64, D)
    a, b = plain(x), skip(x)
    torch.testing.assert_close(b.x_hat, a.x_hat + x @ skip.skip.weight.T)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    torch.testing.assert_close(skip.linear_part(x), x @ skip.skip.weight.T + skip.b_dec)


@pytest.mark.parametrize("kind", TRANSCODER_KINDS)
def test_training_moves_the_skip_jointly_and_keeps_only_decoder_rows_unit(kind):
    torch.manual_seed(0)
    tr = _trainer(kind)
    x, y = _data()
    tr.init_from_sample(x, y, True, "mean")
    fvu = []
    for _ in range(8):
        fvu.append(tr.step(x, y, torch.randn(512, D_OUT) if tr.sae.needs_lm_grad else None).fvu.item())
    w = tr.sae.skip.weight
    assert w.abs().sum() > 0 and not torch.allclose(w.norm(dim=1), torch.ones(D_OUT))
    torch.testing.assert_close(tr.sae.decoder_weight.norm(dim=1), torch.ones(N))
    assert fvu[-1] < fvu[0], fvu
    assert "sae.skip.weight" not in tr.runner.whole_weights() and "skip.weight" in tr.runner.whole_weights()


def test_matryoshka_prefix_losses_include_the_skip():
    from framework.losses import TrainingBatch, normalized_mse  # noqa: PLC0415

    tr = _trainer("matryoshka")
    x, y = _data(64)
    tr.init_from_sample(x, y, True, "mean")
    with torch.no_grad():
        tr.sae.skip.weight.normal_()
    xn, yn = tr.sae.normalize_input(x), tr.sae.normalize_target(y)
    out = tr.sae(xn, batch=TrainingBatch(yn))
    codes = torch.where(out.indices < 8, out.values, torch.zeros(()))
    prefix = codes.new_zeros(64, D_OUT).index_add_(0, torch.arange(64).repeat_interleave(codes.shape[1]),
                                                   codes.reshape(-1, 1) * tr.sae.decoder_weight[out.indices.reshape(-1)])
    expected = normalized_mse(prefix + tr.sae.b_dec + xn @ tr.sae.skip.weight.T, yn)
    torch.testing.assert_close(out.losses["matryoshka"], expected)


def test_skip_learns_the_linear_part_and_eval_reports_what_it_explains():
    torch.manual_seed(0)
    tr = _trainer("topk", lr=1e-2)
    x, y = _data(2048)
    tr.init_from_sample(x, y, True, "mean")
    for step in range(60):
        rows = slice((step % 4) * 512, (step % 4 + 1) * 512)
        tr.step(x[rows], y[rows])
    stats = reconstruction_metrics({"t": tr}, [{"a": x, "b": y}], 2048)["t"].result()
    with torch.no_grad(), tr.evaluating() as sae:
        lin = sae.linear_part(sae.normalize_input(x)) / sae.output_scale
    expected = ((y - lin).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum()).item()
    assert stats["skip_fvu"] == pytest.approx(expected, rel=1e-6)
    assert stats["skip_explained"] == pytest.approx(1 - expected, rel=1e-6)
    assert 0.3 < stats["skip_explained"] < 1 and stats["fvu"] < stats["skip_fvu"]  # latents add to the skip
    plain = _trainer("topk", skip=False)
    assert "skip_fvu" not in reconstruction_metrics({"t": plain}, [{"a": x, "b": y}], 512)["t"].result()


def test_a_skip_on_an_sae_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="skip_connection: .*needs a transcoder"):
        build_sae("topk", D, N, K, skip_connection=True)
    (tmp_path / "acts").mkdir()
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{source: activations, activations_dir: '{tmp_path / 'acts'}'}}\n"
                    "saes:\n  - {kind: jumprelu, skip_connection: true}\n")
    with pytest.raises(ConfigError, match=r"saes\.0\.skip_connection: .*needs a transcoder"):
        load_config(path)
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    path.write_text(f"model: {{name: tiny-gpt2}}\ndata: {{paths: ['{text}']}}\n"
                    "saes:\n  - {kind: topk, site: blocks.0.mlp_in, output_site: blocks.0.mlp_out, skip_connection: true}\n")
    assert load_config(path).saes[0].skip_connection
    with pytest.raises(ConfigError, match=r"saes\.0\.skip_connection"):  # output site = input site: an SAE
        load_config(path, ["saes.0.output_site=blocks.0.mlp_in"])
    with pytest.raises(ConfigError, match=r"saes\.0\.skip_connection: not supported with dist\.latent_shards"):
        load_config(path, ["dist.latent_shards=2"])


# ----------------------------------------------------------------------------- export


def _rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind,arch", [("jumprelu", "jumprelu_skip_transcoder"),
                                       ("batchtopk", "jumprelu_skip_transcoder"),
                                       ("topk", "topk_skip_transcoder")])
def test_export_folds_w_skip_and_saelens_computes_the_same(tmp_path, kind, arch):
    from sae_lens import SAE  # noqa: PLC0415

    torch.manual_seed(1)
    tr = _trainer(kind)
    x, y = _data(1024, seed=2)
    tr.init_from_sample(x, y, True, "geometric_median")
    for _ in range(6):
        tr.step(x, y)
    folder = export.export_sae(tr.sae, tmp_path / "e", kind, {"hook_name": "blocks.0.ln2.hook_normalized",
                                                                "hook_name_out": "blocks.0.hook_mlp_out"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["sparsemill_skip_connection"] is True
    tensors = load_file(str(folder / export.WEIGHTS_FILE))
    s = (tr.sae.input_scale / tr.sae.output_scale).item()
    torch.testing.assert_close(tensors["W_skip"], tr.sae.skip.weight.detach() * s)  # [d_out, d_in], raw units
    loaded = export.load_exported(folder)
    assert type(loaded) is type(tr.sae) and loaded.has_skip
    with tr.evaluating() as sae:
        mine = sae.reconstruct(x)
        torch.testing.assert_close(loaded.eval().reconstruct(x), mine, rtol=1e-5, atol=1e-5)
    if arch == "topk_skip_transcoder":  # no SAELens architecture computes TopK + skip: it must refuse
        with pytest.raises(Exception, match="topk_skip_transcoder"):
            SAE.load_from_disk(str(folder))
        return
    theirs = SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == "JumpReLUSkipTranscoder"
    with torch.no_grad():
        pre = x.double() @ tensors["W_enc"].double() + tensors["b_enc"].double()
        clear = ((pre - tensors["threshold"].double()).abs() > 1e-4 * pre.abs().max()).all(1)
        assert clear.float().mean() > 0.9  # tokens with no latent at its threshold (no rounding ties)
        xc = x[clear]
        err = _rel_err(theirs(xc), mine[clear])
    print(f"SAELens {arch} ({kind}) forward max rel error: {err:.2e}")
    assert err <= 1e-5
