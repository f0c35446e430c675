"""Replacement sets (`eval.replacement_sets`, framework/replacement.py): several single-layer MLP
transcoders spliced in at once, each reading its input from the replaced forward. Their ΔCE /
KL / CE recovered equal a hand-written all-at-once splice (plain torch hooks, no framework
splicing); a set of one is that transcoder's own splice metrics; bad sets are ConfigErrors
naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from framework import evaluate
from framework.activations import LLMSource
from framework.config import ConfigError, DataConfig, ModelConfig, SAEConfig, TrainConfig, load_config
from framework.llm import load_frozen
from framework.sae_trainer import SAETrainer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4  # tiny-gpt2
MEMBERS = {"tc0": ("topk", False), "sk1": ("topk", True), "jr2": ("jumprelu", False), "tc3": ("topk", False)}


def _site(layer: int, kind: str) -> str:
    return f"blocks.{layer}.{kind}"


# ----------------------------------------------------------------------------- config errors


def _cfg(tmp_path: Path, text_dir: Path, sets, **top) -> Path:
    saes = [{"name": f"tc{L}", "site": _site(L, "resid_mid"), "output_site": _site(L, "mlp_out")} for L in range(LAYERS)]
    saes += [{"name": "sk1", "site": _site(1, "resid_mid"), "output_site": _site(1, "mlp_out"), "skip_connection": True},
             {"name": "in2", "site": _site(2, "mlp_in"), "output_site": _site(2, "mlp_out")},
             {"name": "sae", "site": _site(1, "resid_post")},
             {"name": "clt", "kind": "clt", "options": {"layers": "0-1"}},
             {"name": "odd", "site": _site(1, "resid_mid"), "output_site": _site(2, "mlp_out")}]
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": "tiny-gpt2"}, "data": {"paths": [str(text_dir)]},
           "saes": [{"n_latents": 32, "k": 4, **s} for s in saes], "eval": {"replacement_sets": sets}, **top}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_valid_set_loads(tmp_path, text_dir):
    cfg = load_config(_cfg(tmp_path, text_dir, {"plain": ["tc0", "tc1", "tc2", "tc3"], "mixed": ["tc0", "sk1"]}))
    assert cfg.eval.replacement_sets == {"plain": ["tc0", "tc1", "tc2", "tc3"], "mixed": ["tc0", "sk1"]}


@pytest.mark.parametrize("sets, top, message", [
    ({"s": ["tc0", "nope"]}, {}, "eval.replacement_sets.s: no SAE named 'nope'"),
    ({"s": ["tc0", "sae"]}, {}, r"eval.replacement_sets.s: 'sae' \(saes.6\) is an SAE \(no output_site\)"),
    ({"s": ["clt"]}, {}, r"eval.replacement_sets.s: 'clt' \(saes.7\) is a cross-layer transcoder"),
    ({"s": ["odd"]}, {}, "eval.replacement_sets.s: 'odd' .* maps blocks.1.resid_mid -> blocks.2.mlp_out"),
    ({"s": ["tc1", "sk1"]}, {}, "eval.replacement_sets.s: 'sk1' and 'tc1' both replace layer 1's MLP output"),
    ({"s": ["tc0", "in2"]}, {}, r"eval.replacement_sets.s: mixes inputs \(tc0 reads resid_mid, in2 reads mlp_in\)"),
    ({"tc0": ["tc0"]}, {}, "eval.replacement_sets.tc0: 'tc0' is also an SAE's name"),
    ({"s": []}, {}, "eval.replacement_sets.s: list the transcoders"),
    ({"s": "tc0"}, {}, "eval.replacement_sets.s: expected a list"),
    ({"s": ["tc0"]}, {"eval": {"splice": False}}, "eval.replacement_sets: sets are measured by splicing"),
    ({"s": ["tc0"]}, {"dist": {"sae_placement": "layer"}}, "eval.replacement_sets: .*dist.sae_placement: replicated"),
])
def test_bad_sets_fail_naming_the_key(tmp_path, text_dir, sets, top, message):
    path = _cfg(tmp_path, text_dir, sets)
    tree = yaml.safe_load(path.read_text())
    for section, values in top.items():
        tree[section] = {**tree.get(section, {}), **values}
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


# ----------------------------------------------------------------------------- the metrics


@pytest.fixture(scope="module")
def setup(text_dir):
    """tiny-gpt2, and four per-layer transcoders (plain, skip, jumprelu) initialised from its
    activations, with random skip weights so that every part of the predictors matters."""
    torch.manual_seed(0)
    model, tok = load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"))
    sites = [_site(L, k) for L in range(LAYERS) for k in ("resid_mid", "mlp_out")]
    src = LLMSource(DataConfig(paths=[str(text_dir)], context_size=24, llm_batch_size=4), model, tok, sites,
                    torch.device("cpu"), seed=0)
    sample = {k: torch.cat([b[k] for b, _ in zip(src.batches("train"), range(4))]) for k in sites}
    trainers = {}
    for i, (name, (kind, skip)) in enumerate(MEMBERS.items()):
        L = int(name[-1])
        cfg = SAEConfig(name=name, kind=kind, site=_site(L, "resid_mid"), output_site=_site(L, "mlp_out"),
                        n_latents=48, k=4, skip_connection=skip)
        tr = SAETrainer(cfg, TrainConfig(), cfg.site, cfg.output_site, src.dims, 10, torch.device("cpu"), seed=i)
        tr.init_from_sample(sample[cfg.site], sample[cfg.output_site])
        if skip:
            with torch.no_grad():
                tr.sae.skip.weight.normal_(std=0.05)
        trainers[name] = tr
    return src, trainers


def _hand_spliced(src: LLMSource, trainers: dict, members: list[str], n_tokens: int) -> dict[str, float]:
    """Every member's MLP output replaced at the SAE positions by its reconstruction of the
    resid_mid read in the same (replaced) forward, with plain module hooks on GPT-2's blocks."""
    blocks = src.model.transformer.h
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    kl, predicted, seen = 0.0, 0, 0
    saes = {n: trainers[n].sae.eval() for n in members}
    for ids in src.sequences("eval"):
        if seen >= n_tokens:
            break
        seen += ids.numel()
        keep = src.sae_positions(ids)
        logits = {}
        for mode in ce:
            handles, resid_mid = [], {}
            for n in members if mode != "clean" else ():
                block = blocks[int(n[-1])]
                handles.append(block.ln_2.register_forward_pre_hook(
                    lambda m, args, n=n: resid_mid.__setitem__(n, args[0].detach())))

                def replace(m, args, out, n=n):
                    out = out.clone()
                    out[keep] = 0 if mode == "zero" else saes[n].reconstruct(resid_mid[n][keep])
                    return out
                handles.append(block.mlp.register_forward_hook(replace))
            with torch.no_grad():
                logits[mode] = src.model(input_ids=ids, use_cache=False).logits
            for h in handles:
                h.remove()
            ce[mode] += evaluate._next_token_ce(logits[mode], ids).item()
        kl += evaluate._kl_sum(logits["clean"], logits["spliced"]).item()
        predicted += ids[:, 1:].numel()
    for s in saes.values():
        s.train()
    clean, spliced, zero = (ce[m] / predicted for m in ("clean", "spliced", "zero"))
    return {"delta_ce": spliced - clean, "kl": kl / predicted, "ce_recovered": (zero - spliced) / (zero - clean)}


def test_a_set_equals_a_hand_written_all_at_once_splice(setup):
    src, trainers = setup
    n = 2 * 4 * 24  # two LLM batches
    sets = {"all": list(MEMBERS), "two": ["jr2", "sk1"], "one": ["jr2"]}
    metrics = evaluate.splice_metrics(src, trainers, n, lambda t: t, sets)
    for name, members in sets.items():
        expected = _hand_spliced(src, trainers, members, n)
        for key, value in expected.items():
            assert metrics[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
    assert metrics["all"]["splice_tokens"] == metrics["tc0"]["splice_tokens"] == n  # one token population
    for key in ("ce_spliced", "ce_zero_ablated", "delta_ce", "kl", "ce_recovered"):
        assert metrics["one"][key] == metrics["jr2"][key], key  # a set of one is the transcoder's own splice
    # errors compound: replacing every layer moves the output further than the worst single layer
    assert metrics["all"]["kl"] > max(metrics[n]["kl"] for n in MEMBERS)
    assert metrics["all"]["ce_zero_ablated"] != metrics["tc0"]["ce_zero_ablated"]  # every member's MLP ablated


def test_evaluate_reports_sets_with_their_members(setup):
    src, trainers = setup
    result = evaluate.evaluate(src, trainers, 96, 96, True, sets={"all": list(MEMBERS)})
    entry = result["replacement_sets"]["all"]
    assert entry["members"] == list(MEMBERS) and {"delta_ce", "kl", "ce_recovered"} <= entry.keys()
    assert "all" not in result["metrics"] and set(result["metrics"]) == set(MEMBERS)
