"""gsae trained from an LLM: the source yields d(LM loss)/d(activation) next to the activations,
the buffer keeps them row-aligned, and the train loop hands them to the SAE before each step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework import hooks, text_data
from framework.activations import LLMSource
from framework.buffer import MixingBuffer
from framework.config import ConfigError, DataConfig, ModelConfig, load_config
from framework.llm import load_frozen
from framework.train import train
from framework.lm_grads import grad_key
from framework.variants.gsae import GradientSAE

SITES = ["blocks.1.resid_post", "blocks.2.mlp_in", "blocks.2.mlp_out"]
GRAD_SITES = ["blocks.2.mlp_out", "blocks.1.resid_post"]  # the second is below the first: one pass serves both


@pytest.fixture(scope="module")
def gpt2():
    return load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"), seed=3)


def _reference_grad(model, ids, site, keep):
    """d(sum of the kept next-token CEs)/d(activation) by perturbing the site with a zero
    tensor that requires grad: one separate forward per site."""
    delta = {}

    def add(act):
        delta["d"] = torch.zeros_like(act, requires_grad=True)
        return act + delta["d"]

    with torch.enable_grad(), hooks.splice(model, hooks.parse_site(site), add):
        logits = model(input_ids=ids, use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        (ce * keep[:, 1:].flatten()).sum().backward()
    return delta["d"].grad


def test_source_grads_equal_independent_autograd(gpt2, text_dir):
    model, tok = gpt2
    data = DataConfig(paths=[str(text_dir)], context_size=20, llm_batch_size=3)
    src = LLMSource(data, model, tok, SITES, torch.device("cpu"), seed=0, grad_sites=GRAD_SITES)
    assert set(src.dims) == set(SITES)  # no grad keys among the widths
    stream = text_data.sequence_batches(data, tok, "train", 0, position=text_data.TextPosition())  # the same ids
    for _, raw, ids in zip(range(2), src._raw("train"), stream):
        keep = text_data.keep_mask(ids, src.specials, True)
        assert set(raw) == set(SITES) | {grad_key(s) for s in GRAD_SITES}
        plain = src.capture(ids)  # early-stopped, no gradients
        for site in SITES:
            torch.testing.assert_close(raw[site], plain[site][keep], rtol=1e-5, atol=1e-6)
        for site in GRAD_SITES:
            ref = _reference_grad(model, ids, site, keep)[keep]
            assert ref.abs().sum() > 0
            torch.testing.assert_close(raw[grad_key(site)], ref, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    eval_batch = next(src.batches("eval"))
    assert set(eval_batch) == set(SITES)  # evaluation is plain TopK: no gradient work


def test_outlier_filter_ignores_gradient_norms_and_buffer_keeps_rows_aligned(gpt2, text_dir):
    model, tok = gpt2
    data = DataConfig(paths=[str(text_dir)], context_size=20, llm_batch_size=3, norm_outlier_factor=3.0)
    src = LLMSource(data, model, tok, SITES[:1], torch.device("cpu"), seed=0, grad_sites=SITES[:1])
    site, gkey = SITES[0], grad_key(SITES[0])
    acts = torch.randn(10, 4)
    grads = torch.randn(10, 4)
    grads[3] *= 1e4  # a huge gradient: the token stays
    kept = src._clean({site: acts, gkey: grads}, src.skipped["train"])
    assert kept[site].shape[0] == 10
    acts[5] *= 1e4  # a huge activation: the token goes, with its gradient
    kept = src._clean({site: acts, gkey: grads}, src.skipped["train"])
    assert kept[site].shape[0] == 9 and torch.equal(kept[gkey], torch.cat([grads[:5], grads[6:]]))

    def items(n, start):
        x = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 3)
        return {site: x, gkey: -2 * x}

    buf = MixingBuffer(capacity=64, batch_size=16, seed=0, device=torch.device("cpu"))
    stream = iter([items(23, 100 * i) for i in range(12)])
    out = []
    for i, batch in enumerate(buf.batches(stream)):
        out.append(batch)
        if i == 4:  # a checkpoint mid-stream keeps extra keys too
            restored = MixingBuffer(64, 16, 0, torch.device("cpu"))
            restored.load_tensors(buf.tensors())
            buf = restored
            out.extend(buf.batches(stream))
            break
    assert len(out) > 10
    for batch in out:
        torch.testing.assert_close(batch[gkey], -2 * batch[site])
    assert any((batch[site][:, 0] // 100).unique().numel() > 1 for batch in out)  # rows of several items mixed


def _run_config(tmp_path, text_dir, *extra):
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", "model.name=tiny-gpt2", "model.device=cpu", "train.device=cpu",
        f"data.paths=[{text_dir}]", "data.context_size=32", "data.llm_batch_size=4",
        "saes=[{name: g, site: blocks.1.resid_post, kind: gsae, n_latents: 128, k: 4, options: {beta: 4.0}},"
        " {name: t, site: blocks.1.resid_post, n_latents: 128, k: 4}]",
        "train.total_tokens=1024", "train.batch_size=128", "train.buffer_tokens=256", "train.init_tokens=128",
        "train.resume=false", "eval.tokens=128", "eval.splice_tokens=32", "log.progress=false",
        "log.tensorboard=false", *extra])


def test_train_hands_each_batch_its_gradient(tmp_path, text_dir, monkeypatch):
    received, differs = [], []
    forward = GradientSAE.forward

    def spy_forward(self, x, k=None, batch=None):
        given = batch is not None and batch.lm_grad is not None and self.training
        if self.training:
            received.append(tuple(batch.lm_grad.shape) if given else None)
        out = forward(self, x, k, batch)
        if given:  # the same weights, plain TopK: does the gradient change the selection?
            _, topk = self.encode(x, k or self.k)
            differs.append(float((out.indices.sort(1).values != topk.sort(1).values).any(1).float().mean()))
        return out

    monkeypatch.setattr(GradientSAE, "forward", spy_forward)
    summary = train(_run_config(tmp_path, text_dir))
    assert summary["steps"] == 8
    assert received == [(128, 64)] * 8  # one gradient per step, rows of the batch, width of the site
    assert len(differs) == 8 and min(differs) > 0  # beta > 0: the gradient changes which latents fire
    for name in ("g", "t"):
        assert 0 < summary["saes"][name]["fvu"] < 2 and "delta_ce" in summary["saes"][name]


def test_gsae_fails_early_where_no_gradient_exists(tmp_path, text_dir, gpt2):
    with pytest.raises(ConfigError, match="cached activations"):
        acts = tmp_path / "acts"
        acts.mkdir()
        load_config(None, [f"run_dir={tmp_path}", "data.source=activations", f"data.activations_dir={acts}",
                           "saes=[{kind: gsae}]"])
    with pytest.raises(ConfigError, match="'tiny-bert' is an encoder"):
        _run_config(tmp_path, text_dir, "model.name=tiny-bert")
    with pytest.raises(ConfigError, match="routed batches carry only activations"):
        _run_config(tmp_path, text_dir, "dist.sae_placement=layer")
    bert, tok = load_frozen(ModelConfig(name="tiny-bert", device="cpu"))
    data = DataConfig(paths=[str(text_dir)])
    with pytest.raises(ConfigError, match="has no LM head"):  # a model only known once loaded
        LLMSource(data, bert, tok, SITES[:1], torch.device("cpu"), seed=0, grad_sites=SITES[:1])
    model, tok = gpt2
    with pytest.raises(ValueError, match="not among the captured sites"):
        LLMSource(data, model, tok, SITES[:1], torch.device("cpu"), seed=0, grad_sites=SITES[1:2])
