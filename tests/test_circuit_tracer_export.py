"""circuit-tracer (0.5.0) loads our transcoders: skip transcoders trained by `train()` on every
MLP of tiny-gpt2 export to its transcoder-set layout, load through its own loaders, compute
what ours compute, and drive an attribution graph on the same model converted to
TransformerLens, whose active features are the ones our transcoders find. TopK transcoders,
which its file loader cannot express, go through `export.circuit_tracer_set`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from framework import export, hooks
from framework.cli import main
from framework.config import ModelConfig, load_config
from framework.llm import load_frozen
from framework.train import train
from tracer_models import tl_replacement_model  # first: it readies circuit-tracer's imports

from circuit_tracer.transcoder.single_layer_transcoder import load_relu_transcoder  # noqa: E402
from circuit_tracer.utils.caching import load_transcoders_from_cache  # noqa: E402

LAYERS = 4  # tiny-gpt2's depth: circuit-tracer wants a transcoder for every layer


def _run(tmp_path: Path, text_dir: Path, kind: str, options: dict, skip: bool) -> Path:
    saes = [{"name": f"tc{L}", "kind": kind, "site": f"blocks.{L}.mlp_in", "output_site": f"blocks.{L}.mlp_out",
             "n_latents": 128, "k": 8, "skip_connection": skip, "options": options} for L in range(LAYERS)]
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": "tiny-gpt2"},
           "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8},
           "saes": saes,
           "train": {"total_tokens": 10 * 256, "batch_size": 256, "buffer_tokens": 1024, "init_tokens": 512,
                     "warmup_steps": 2, "checkpoint_every": 0},
           "eval": {"tokens": 256, "splice": False}, "log": {"progress": False, "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = train(load_config(path))
    for L in range(LAYERS):  # the skip's share of the explained variance is reported
        assert ("skip_explained" in summary["saes"][f"tc{L}"]) == skip
    return tmp_path / "run" / "export"


@pytest.fixture(scope="module")
def jumprelu_run(tmp_path_factory, text_dir) -> Path:
    return _run(tmp_path_factory.mktemp("ct"), text_dir, "jumprelu", {"bandwidth": 0.1}, skip=True)


def _rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _clear_tokens(x: torch.Tensor, tc) -> torch.Tensor:
    """Rows with no pre-activation within a rounding margin of its threshold."""
    pre = x.double() @ tc.W_enc.double().T + tc.b_enc.double()
    theta = tc.activation_function.threshold.double()
    return ((pre - theta).abs() > 1e-4 * pre.abs().max()).all(1)


def test_circuit_tracer_loads_the_set_and_computes_the_same(jumprelu_run, tmp_path):
    folders = [jumprelu_run / f"tc{L}" for L in range(LAYERS)]
    out = export.export_circuit_tracer(folders, tmp_path / "ct" / "tiny-gpt2-skip")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg == {"model_kind": "transcoder_set", "model_name": "tiny-gpt2", "feature_input_hook": "mlp.hook_in",
                   "feature_output_hook": "mlp.hook_out", "scan": "tiny-gpt2-skip"}
    tset, config = load_transcoders_from_cache("tiny-gpt2-skip", cache_dir=tmp_path / "ct", device=torch.device("cpu"),
                                               lazy_decoder=False)
    assert config["model_kind"] == "transcoder_set" and len(tset) == LAYERS and tset.skip_connection
    errs = {}
    for L, folder in enumerate(folders):
        ours = export.load_exported(folder).eval()
        tc = tset[L]
        assert type(tc.activation_function).__name__ == "JumpReLU"
        lazy = load_relu_transcoder(str(out / f"layer_{L}.safetensors"), L, device=torch.device("cpu"))  # lazy files
        x = torch.randn(512, ours.d_in, generator=torch.Generator().manual_seed(L)) * 2
        keep = _clear_tokens(x, tc)
        assert keep.float().mean() > 0.9
        x = x[keep]
        with torch.no_grad():
            o = ours(x)
            codes = torch.zeros(x.shape[0], ours.n_latents).scatter_add(1, o.indices, o.values)
            errs[L] = {"encode": _rel_err(tc.encode(x), codes), "forward": _rel_err(tc(x), o.x_hat),
                       "skip": _rel_err(tc.compute_skip(x), x @ ours.skip.weight.T),
                       "lazy_forward": _rel_err(lazy(x), o.x_hat)}
    print("circuit-tracer max rel errors per layer:", json.dumps(errs))
    assert max(v for e in errs.values() for v in e.values()) <= 1e-5, errs


def test_attribution_graph_on_tiny_gpt2_uses_our_features(jumprelu_run, tmp_path):
    from circuit_tracer import attribute  # noqa: PLC0415

    folders = [jumprelu_run / f"tc{L}" for L in range(LAYERS)]
    assert main(["circuit-tracer", *map(str, folders), "--out", str(tmp_path / "ct" / "set")]) == 0
    assert main(["circuit-tracer", str(folders[1]), "--out", str(tmp_path / "bad")]) == 2  # layer 0 missing: a data error
    tset, _ = load_transcoders_from_cache("set", cache_dir=tmp_path / "ct", device=torch.device("cpu"),
                                          lazy_decoder=False)
    hf, tok = load_frozen(ModelConfig(name="tiny-gpt2"), seed=0)  # the model the run trained on (seed 0)
    model = tl_replacement_model(hf, tok, tset, tmp_path / "tokenizer")
    ids = torch.tensor([tok.bos_token_id] + tok("the quick brown fox jumps")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids[None]), hf(ids[None]).logits, rtol=1e-4, atol=1e-4)  # same model
        specs = [hooks.parse_site(f"blocks.{L}.mlp_in") for L in range(LAYERS)]
        with hooks.capture(hf, specs, stop_early=False) as acts:
            hf(ids[None])
    graph = attribute(ids, model, max_n_logits=3, batch_size=64)
    n_pos = ids.numel()
    n_feat = graph.active_features.shape[0]
    assert graph.adjacency_matrix.shape[0] == n_feat + LAYERS * n_pos + n_pos + len(graph.logit_targets)
    assert n_feat > 0 and torch.isfinite(graph.adjacency_matrix).all()
    # the graph's active features are our transcoders' codes (position 0, BOS, is zeroed by circuit-tracer)
    theirs = {tuple(f.tolist()) for f in graph.active_features}
    mine, ambiguous = set(), set()
    for L, folder in enumerate(folders):
        ours = export.load_exported(folder).eval()
        x = acts[f"blocks.{L}.mlp_in"][0]
        with torch.no_grad():
            o = ours(x)
            pre = x.double() @ ours.encoder_weight.double().T + ours.encoder_bias.double()
        for pos, feat in zip(*torch.nonzero(torch.zeros(n_pos, ours.n_latents).scatter_add(1, o.indices, o.values)).T.tolist()):
            if pos > 0:
                mine.add((L, pos, feat))
        near = (pre - ours.threshold().double()).abs() < 1e-4 * pre.abs().max()
        ambiguous |= {(L, p, f) for p, f in near.nonzero().tolist()}
    assert not ((theirs ^ mine) - ambiguous), sorted((theirs ^ mine) - ambiguous)[:10]
    print(f"attribution graph: {n_feat} active features over {LAYERS} layers x {n_pos} positions; "
          f"adjacency {tuple(graph.adjacency_matrix.shape)}; ours and theirs differ at {len(theirs ^ mine)} near-threshold entries")


def test_topk_transcoders_need_the_in_memory_set(tmp_path):
    from framework.kinds import build_sae  # noqa: PLC0415

    folders = []
    for L in range(LAYERS):  # untrained TopK MLP transcoders, normalisation from a sample
        sae = build_sae("topk", 64, 128, 8, d_out=64, seed=L)
        x = torch.randn(512, 64, generator=torch.Generator().manual_seed(L)) * 3
        sae.init_from_sample(x, x @ torch.randn(64, 64) * 0.1, True, "mean")
        folders.append(export.export_sae(sae, tmp_path / f"tc{L}", "topk", {
            "model_name": "tiny-gpt2", "hook_name": f"blocks.{L}.ln2.hook_normalized", "hook_name_out": f"blocks.{L}.hook_mlp_out"}))
    with pytest.raises(ValueError, match="would\\s+load this 'topk' one as a ReLU"):
        export.export_circuit_tracer(folders, tmp_path / "ct")
    with pytest.raises(ValueError, match="missing layers \\[1\\]"):
        export.circuit_tracer_set([folders[0], folders[2], folders[3]])
    tset = export.circuit_tracer_set(folders)
    assert not tset.skip_connection
    errs = []
    for L, folder in enumerate(folders):
        ours = export.load_exported(folder).eval()
        x = torch.randn(256, ours.d_in, generator=torch.Generator().manual_seed(L)) * 2
        with torch.no_grad():
            o = ours(x)
            codes = torch.zeros(x.shape[0], ours.n_latents).scatter_add(1, o.indices, o.values)
            errs.append(max(_rel_err(tset[L].encode(x), codes), _rel_err(tset[L](x), o.x_hat)))
    print("circuit-tracer (in-memory TopK) max rel errors per layer:", errs)
    assert max(errs) <= 1e-5, errs
