"""Cross-layer transcoders (kinds clt and jumprelu_clt): config errors, the math against a
dense reference, training end to end through `sparsemill train` on tiny-gpt2 (replacement-model
and per-layer metrics), bitwise resume, and circuit-tracer's own CLT loader on our export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _selection import assert_same_topk
from framework import checkpoint, clt_export, export
from framework.cli import main
from framework.config import ConfigError, load_config
from framework.kinds import build_sae
from framework.losses import TrainingBatch
from framework.train import train
from tracer_models import tl_replacement_model  # first: it readies circuit-tracer's imports


LAYERS, D = 4, 64  # tiny-gpt2
KINDS = ["clt", "jumprelu_clt"]  # every cross-layer kind (tests/test_saelens_interop.py checks the list)


def _cfg(tmp_path: Path, text_dir: Path, **sae) -> Path:
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": "tiny-gpt2"},
           "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8},
           "saes": [{"name": "clt", "kind": "clt", "n_latents": 48, "k": 4, "dead_after_tokens": 512,
                     "options": {"layers": "0-3"}, **sae}],
           "train": {"total_tokens": 8 * 128, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 256,
                     "warmup_steps": 2, "checkpoint_every": 0},
           "eval": {"tokens": 256, "splice_tokens": 256}, "log": {"progress": False, "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("sae, message", [
    ({"options": {"layers": [0, 2, 3]}}, "saes.0.options.layers: [0, 2, 3] is not contiguous"),
    ({"options": {"layers": [2, 1]}}, "saes.0.options.layers: [2, 1] is not contiguous"),
    ({"options": {"layers": "3-1"}}, "saes.0.options.layers: '3-1' is empty"),
    ({"options": {"layers": "a-b"}}, "saes.0.options.layers: 'a-b' is not a layer range"),
    ({"options": {}}, "saes.0.options.layers: required for kind clt"),
    ({"site": "blocks.0.resid_post"}, "saes.0.site: kind clt reads and writes the sites of saes.0.options.layers"),
    ({"skip_connection": True}, "saes.0.skip_connection: not supported for kind clt"),
    ({"kind": "jumprelu_clt", "options": {"layers": "0-3", "l0_coef": 0.1, "target_l0": 4}},
     "saes.0.options.l0_coef / options.target_l0: give one"),
    ({"kind": "jumprelu_clt", "options": {"layers": [0, 2]}}, "saes.0.options.layers: [0, 2] is not contiguous"),
    ({"kind": "topk", "site": "blocks.1.resid_post", "options": {}, "skip_connection": True},
     "saes.0.skip_connection: a skip connection maps the input site"),
])
def test_bad_clt_configs_fail_naming_the_key(tmp_path, text_dir, sae, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(_cfg(tmp_path, text_dir, **sae))


def test_layers_beyond_the_model_fail_before_training(tmp_path, text_dir):
    cfg = load_config(_cfg(tmp_path, text_dir, options={"layers": "2-5"}))
    assert cfg.saes[0].site == "blocks.2-5.resid_mid" and cfg.saes[0].output_site == "blocks.2-5.mlp_out"
    with pytest.raises(ConfigError, match="saes.0.options: hook site 'blocks.4.resid_mid': layer 4 out of range, model has 4 layers"):
        train(cfg)


def _dense_codes(sae, xn: torch.Tensor) -> list[torch.Tensor]:
    """Float64 per-layer codes [B, per_layer] of a CLT on normalised input: relu + top k (clt),
    pre where pre > theta (jumprelu_clt)."""
    m, d = sae.per_layer, sae.d_model_in
    codes = []
    for i in range(sae.n_layers):
        pre = xn[:, i * d:(i + 1) * d].double() @ sae.encoder_weight[i * m:(i + 1) * m].double().T
        pre = pre + sae.encoder_bias[i * m:(i + 1) * m].double()
        if sae.export_activation == "jumprelu":
            codes.append(torch.where(pre > sae.threshold()[i * m:(i + 1) * m].double(), pre, 0))
        else:
            v, j = pre.relu().topk(sae.k, dim=1)
            codes.append(torch.zeros_like(pre).scatter(1, j, v))
    return codes


def _agreeing_rows(sae, out, xn: torch.Tensor) -> torch.Tensor:
    """Rows whose selection in every layer is away from a near-tie (top k) or a threshold
    (JumpReLU): another path may round those either way (tests/_selection.py)."""
    m, d = sae.per_layer, sae.d_model_in
    agree = torch.ones(xn.shape[0], dtype=torch.bool)
    for i in range(sae.n_layers):
        pre = (xn[:, i * d:(i + 1) * d].double() @ sae.encoder_weight[i * m:(i + 1) * m].double().T
               + sae.encoder_bias[i * m:(i + 1) * m].double())
        if sae.export_activation == "jumprelu":
            agree &= ((pre - sae.threshold()[i * m:(i + 1) * m].double()).abs() > 1e-5).all(1)
        else:
            layer = (out.indices // m) == i
            ids = out.indices[layer].view(-1, sae.k) - i * m
            agree &= assert_same_topk(ids, pre, sae.k)
    return agree


def _as_dense(sae, out, i: int) -> torch.Tensor:
    """Layer i's codes of an SAEOutput, dense [B, per_layer]."""
    m = sae.per_layer
    mine = (out.indices // m) == i
    return torch.zeros(out.values.shape[0], m, dtype=out.values.dtype).scatter_add(
        1, torch.where(mine, out.indices - i * m, 0), torch.where(mine, out.values, 0))


@pytest.mark.parametrize("kind", KINDS)
def test_clt_math_matches_a_dense_reference_and_the_layerwise_splice(kind):
    sae = build_sae(kind, 3 * 16, 32, 4, d_out=3 * 16, seed=1, options={"layers": [1, 2, 3]})
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.encoder_bias.normal_()
        sae.b_dec.normal_()
    sae.init_from_sample(x, x, False, "zeros")  # JumpReLU: thresholds where the sample fires k per layer
    sae.eval()
    out = sae(x)
    codes = _dense_codes(sae, x)
    agree = _agreeing_rows(sae, out, x)
    assert agree.float().mean() > 0.9
    ref = sae.b_dec.double().expand(64, -1).clone()
    for i, code in enumerate(codes):
        torch.testing.assert_close(_as_dense(sae, out, i)[agree].double(), code[agree], rtol=1e-5, atol=1e-5)
        ref[:, 16 * i:] += code @ sae.decoders[i].double().flatten(1)
    if kind == "jumprelu_clt":  # the thresholds started where the sample fires about k latents per layer
        assert 0.5 * 3 * 4 < (out.values != 0).sum(1).float().mean() < 2 * 3 * 4
    torch.testing.assert_close(out.x_hat[agree].double(), ref[agree], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(out.values, out.indices), out.x_hat)  # the generic (AuxK) decode
    predict = sae.splice_predictor()  # layer by layer, as the replacement forward calls it
    torch.testing.assert_close(torch.cat([predict(j, x[:, 16 * j:16 * (j + 1)]) for j in range(3)], 1), out.x_hat)
    assert [p.shape for p in sae.decoders] == [(32, 3, 16), (32, 2, 16), (32, 1, 16)]  # n(n+1)/2 blocks


def test_jumprelu_clt_trains_its_thresholds_through_the_kernel_window():
    """The training forward keeps only candidates above theta - eps/2; the thresholds and the
    encoder get gradient, and the penalty is the L0 summed over layers."""
    sae = build_sae("jumprelu_clt", 3 * 16, 32, 4, d_out=3 * 16, seed=1, options={"layers": [0, 1, 2]})
    x, y = (torch.randn(128, 48, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    sae.init_from_sample(x, y, True, "mean")
    out = sae(sae.normalize_input(x), batch=TrainingBatch(target=sae.normalize_target(y)))
    loss = sae.reconstruction_loss(out.x_hat, TrainingBatch(target=sae.normalize_target(y))) + out.losses["l0"]
    loss.backward()
    assert sae.log_threshold.grad.abs().sum() > 0 and sae.encoder_weight.grad.abs().sum() > 0
    l0 = float((out.values != 0).sum(1).float().mean())
    assert out.losses["l0"].item() == pytest.approx(sae.coefficient().item() * l0, rel=1e-5)
    assert sae.target_l0() == 3 * 4


def _straight_and_stopped(tmp_path: Path, text_dir: Path, monkeypatch, stop_step: int, kind: str) -> None:
    from framework import train as train_module  # noqa: PLC0415
    from framework.preemption import Preempted  # noqa: PLC0415

    path = _cfg(tmp_path, text_dir, kind=kind)
    assert main(["train", str(path), "--quiet", "--run-dir", str(tmp_path / "straight")]) == 0
    calls = iter(range(1, 10**6))
    monkeypatch.setattr(train_module.PreemptionFlag, "should_stop", lambda self, engine: next(calls) == stop_step)
    with pytest.raises(Preempted):
        train(load_config(path, [f"run_dir={tmp_path / 'stopped'}"]))
    monkeypatch.undo()
    train(load_config(path, [f"run_dir={tmp_path / 'stopped'}"]))


@pytest.fixture(scope="module", params=KINDS)
def runs(request, tmp_path_factory, text_dir) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as mp:
        _straight_and_stopped(root, text_dir, mp, stop_step=3, kind=request.param)
    (root / "kind").write_text(request.param)
    return root


def _final(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_trains_end_to_end_with_replacement_and_per_layer_metrics(runs):
    m = json.loads((runs / "straight" / "eval.json").read_text())["clt"]
    topk = (runs / "kind").read_text() == "clt"
    for L in range(LAYERS):
        assert 0 < m[f"fvu.layer{L}"] < 1 and 0 < m[f"l0.layer{L}"] and (m[f"l0.layer{L}"] <= 4 or not topk)
    assert m["l0"] == pytest.approx(sum(m[f"l0.layer{L}"] for L in range(LAYERS)))
    assert m["fvu_layer_mean"] == pytest.approx(sum(m[f"fvu.layer{L}"] for L in range(LAYERS)) / LAYERS)
    for key in ("delta_ce", "kl", "ce_recovered", "ce_zero_ablated"):
        assert key in m and m[key] == m[key]
    assert m["kl"] > 0  # every layer's MLP output was replaced


def test_resume_is_bitwise(runs):
    a = checkpoint.read_saved(_final(runs / "straight"), "clt").shared
    b = checkpoint.read_saved(_final(runs / "stopped"), "clt").shared
    assert set(a.tensors.keys()) == set(b.tensors.keys()) and any("decoders.3" in k for k in a.tensors.keys())
    for key in a.tensors.keys():
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def _trained(run: Path):
    """The checkpoint's CLT in training units (its own scales): not through the export."""
    tensors = checkpoint.read_saved(_final(run), "clt").shared.tensors
    weights = {k[len("sae."):]: tensors[k] for k in tensors.keys() if k.startswith("sae.")}
    sae = build_sae((run.parent / "kind").read_text(), LAYERS * D, 48, 4, d_out=LAYERS * D, options={"layers": "0-3"})
    sae.load_state_dict(weights)
    return sae.eval()


def test_circuit_tracer_loads_our_clt_and_computes_the_same(runs, tmp_path):
    folder = runs / "straight" / "export" / "clt"
    ct_cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert ct_cfg["model_kind"] == "cross_layer_transcoder" and ct_cfg["feature_input_hook"] == "hook_resid_mid"
    clt = clt_export.circuit_tracer_clt(folder)
    assert (clt.n_layers, clt.d_transcoder, clt.d_model) == (LAYERS, 48, D)
    jumprelu = (runs / "kind").read_text() == "jumprelu_clt"
    assert (type(clt.activation_function).__name__ == "JumpReLU") == jumprelu  # circuit-tracer's own, from the files
    ours = _trained(runs / "straight")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, LAYERS * D, generator=g) / ours.input_scale.repeat_interleave(D)  # raw-scale inputs
    with torch.no_grad():
        theirs_codes = clt.encode(x.view(-1, LAYERS, D).transpose(0, 1))  # [layers, B, d_sae]
        theirs = clt.decode(theirs_codes.to_sparse()).transpose(0, 1).reshape(256, -1)
        xn = ours.normalize_input(x)
        out = ours(xn)
        mine = ours.reconstruct(x)
    agree = _agreeing_rows(ours, out, xn)
    assert agree.float().mean() > 0.9
    for i in range(LAYERS):
        dense = _as_dense(ours, out, i)
        err = (theirs_codes[i][agree] - dense[agree]).abs().max() / dense[agree].abs().max()
        assert err <= 1e-5, (i, err)
    rel = ((theirs[agree] - mine[agree]).abs().max() / mine[agree].abs().max()).item()
    assert rel <= 1e-5, rel
    reloaded = export.load_exported(folder)  # our own loader of the same files
    torch.testing.assert_close(reloaded.reconstruct(x)[agree], mine[agree], rtol=1e-5, atol=1e-5 * mine.abs().max().item())


def test_attribution_graph_on_tiny_gpt2_uses_our_clt_features(runs, tmp_path):
    """circuit-tracer's attribution over our exported CLT (spanning all of tiny-gpt2's layers):
    the graph's active features are the ones our CLT finds on the same tokens."""
    from circuit_tracer import attribute  # noqa: PLC0415

    from framework import hooks  # noqa: PLC0415
    from framework.config import ModelConfig  # noqa: PLC0415
    from framework.llm import load_frozen  # noqa: PLC0415

    folder = runs / "straight" / "export" / "clt"
    hf, tok = load_frozen(ModelConfig(name="tiny-gpt2"), seed=0)  # the model the run trained on (seed 0)
    model = tl_replacement_model(hf, tok, clt_export.circuit_tracer_clt(folder), tmp_path / "tokenizer")
    ids = torch.tensor([tok.bos_token_id] + tok("the quick brown fox jumps over")["input_ids"])
    specs = [hooks.parse_site(f"blocks.{L}.resid_mid") for L in range(LAYERS)]
    with torch.no_grad(), hooks.capture(hf, specs, stop_early=False) as acts:
        hf(ids[None])
    graph = attribute(ids, model, max_n_logits=3, batch_size=64)
    n_pos, n_feat = ids.numel(), graph.active_features.shape[0]
    assert n_feat > 0 and torch.isfinite(graph.adjacency_matrix).all()
    assert graph.adjacency_matrix.shape[0] == n_feat + LAYERS * n_pos + n_pos + len(graph.logit_targets)
    ours = export.load_exported(folder)  # raw units
    x = torch.cat([acts[s.name][0] for s in specs], 1)  # [positions, layers * d]
    with torch.no_grad():
        out = ours(x)
    agree = _agreeing_rows(ours, out, x)  # positions whose selection no rounding can flip
    mine = {(L, pos, feat) for L in range(LAYERS) for pos, feat in _as_dense(ours, out, L).nonzero().tolist()
            if pos > 0 and agree[pos]}  # circuit-tracer zeroes position 0 (BOS)
    theirs = {tuple(f) for f in graph.active_features.tolist() if agree[f[1]]}
    assert int(agree[1:].sum()) >= n_pos // 2 and mine == theirs, sorted(mine ^ theirs)[:10]
    print(f"attribution graph over our CLT: {n_feat} active features, {len(mine)} compared at {int(agree[1:].sum())} of "
          f"{n_pos - 1} positions")


def test_export_from_a_checkpoint_writes_the_clt_layout(runs, tmp_path):
    (folder,) = export.export_checkpoint(runs / "stopped", out=tmp_path / "exp")
    assert sorted(p.name for p in folder.glob("W_dec_*.safetensors")) == [f"W_dec_{i}.safetensors" for i in range(LAYERS)]
    assert json.loads((folder / "cfg.json").read_text())["layers"] == list(range(LAYERS))


def test_resid_mid_is_the_stream_between_attention_and_mlp():
    from framework import hooks  # noqa: PLC0415
    from framework.config import ModelConfig  # noqa: PLC0415
    from framework.llm import load_frozen  # noqa: PLC0415

    model, _ = load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"))
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    specs = [hooks.parse_site(f"blocks.2.{k}") for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")]
    with hooks.capture(model, specs, stop_early=False) as acts, torch.no_grad():
        model(input_ids=ids)
    a = {s.kind: acts[s.name] for s in specs}
    torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + a["attn_out"])
    torch.testing.assert_close(a["resid_post"], a["resid_mid"] + a["mlp_out"])
