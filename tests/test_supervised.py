"""Supervised-dictionary evaluation: the dictionary and F1 arithmetic on planted data, and the
whole `sparsemill evaluate-supervised` on a tiny model with a planted perfect SAE (its
reconstruction is exact, so approximation must read perfect), plus clear errors."""

import itertools
import json

import pytest
import torch
import yaml

from framework import export, supervised, templates
from framework.cli import main
from framework.config import ConfigError
from framework.sae import TopKSAE

D = 64  # tiny-llama's width


def test_supervised_dictionary_recovers_planted_features():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(8, generator=g)
    u = {"a": {v: torch.randn(8, generator=g) for v in "xyz"}, "b": {v: torch.randn(8, generator=g) for v in "pq"}}
    for attr in u:  # centred: a balanced design's values sum to zero
        centre = torch.stack(list(u[attr].values())).mean(0)
        u[attr] = {v: f - centre for v, f in u[attr].items()}
    pairs = list(itertools.product("xyz", "pq")) * 3
    labels = {"a": [a for a, _ in pairs], "b": [b for _, b in pairs]}
    x = torch.stack([mean + u["a"][a] + u["b"][b] for a, b in pairs])
    sup = supervised.SupervisedDictionary.fit(x, labels)
    for attr in u:
        for v in u[attr]:
            torch.testing.assert_close(sup.features[attr][v], u[attr][v], atol=1e-5, rtol=0)
    assert supervised.fvu(x, sup.reconstruct(labels, len(pairs))) < 1e-10


def test_f1_scores():
    label = torch.tensor([True, True, False, False, False])
    active = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(supervised.latent_f1(active, label), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert supervised.f1_best_threshold(torch.tensor([0.9, 0.8, 0.1, 0.3, 0.2]), label) == pytest.approx(1.0)
    # a tie across the classes cannot be split: the best cut takes 3 for 2 positives
    assert supervised.f1_best_threshold(torch.tensor([0.9, 0.5, 0.5, 0.1, 0.1]), label) == pytest.approx(0.8)


def _task(n=40) -> templates.Task:
    """Byte-tokenizer prompts; `c` decides the answer (its own letter), `d` is a second attribute."""
    pos = []
    for i in range(n):
        c, d = "pqrs"[i % 4], "xyz"[(i // 4) % 3]
        pos.append(templates.Example(f"{d}{c}{d} then {c}{d} and {d}", c, "k", {"c": c, "d": d}))
    return templates.Task("toy", pos, pos)


def _perfect_sae(folder, site="blocks.2.hook_resid_post", d=D):
    """Latents = the positive and negative parts of each coordinate (k = d of 2d): exact."""
    sae = TopKSAE(d, 2 * d, d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder_weight.copy_(torch.cat([eye, -eye]))
        sae.decoder_weight.copy_(torch.cat([eye, -eye]))
        sae.encoder_bias.zero_()
        sae.b_dec.zero_()
    export.export_sae(sae, folder, "topk", {"hook_name": site, "model_name": "tiny-llama"})
    return folder


def _write(tmp_path, **over) -> str:
    (tmp_path / "task.json").write_text(json.dumps(_task().to_json()))
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": "tiny-llama", "device": "cpu"},
           "sae": str(_perfect_sae(tmp_path / "sae")), "task": str(tmp_path / "task.json"),
           "control_attribute": "c", "edit_latents": [1, 8, 128]} | over
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "s.yaml")


def test_evaluate_supervised_end_to_end_with_a_perfect_sae(tmp_path, capsys):
    assert main(["evaluate-supervised", _write(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "approximation" in out and "control (c)" in out and "interpretability" in out
    r = json.loads((tmp_path / "run" / "supervised_eval.json").read_text())
    assert r["site"] == "blocks.2.hook_resid_post" and r["attributes"] == ["c", "d"]
    assert r["fit_examples"] == 20 and 10 <= r["eval_examples"] <= 20
    ap = r["approximation"]
    assert ap["fvu"]["sae"] < 1e-8 and ap["logit_diff_recovered"]["sae"] == pytest.approx(1.0, abs=1e-4)
    assert all(c == pytest.approx(1.0, abs=1e-4) for c in ap["feature_cosine_sae_vs_supervised"].values())
    assert 0 < ap["fvu"]["supervised"] < 1  # the attributes explain part of the variance, not all
    for name in ("supervised", "random_direction", "sae_1_latents", "sae_8_latents", "sae_128_latents"):
        row = r["control"][name]
        assert 0 <= row["success"] <= 1 and 0 <= row["new_answer_top1"] <= 1 and row["collateral_kl"] >= 0
    for attr in ("c", "d"):
        it = r["interpretability"][attr]
        assert set(it["values"]) == ({"p", "q", "r", "s"} if attr == "c" else {"x", "y", "z"})
        assert 0 < it["mean_best_latent_f1"] <= 1 and 0 < it["mean_supervised_f1"] <= 1


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    assert main(["evaluate-supervised", _write(tmp_path, control_attribute="colour")]) == 2
    assert "control_attribute: 'colour' is not an attribute of positive[0]" in capsys.readouterr().err
    task = _task()
    task.positive[5].answer = "z"  # c=q now answers both "q" and "z"
    (tmp_path / "t2.json").write_text(json.dumps(task.to_json()))
    assert main(["evaluate-supervised", _write(tmp_path), f"task={tmp_path / 't2.json'}"]) == 2
    assert "the control attribute must determine the answer" in capsys.readouterr().err
    assert main(["evaluate-supervised", _write(tmp_path), f"sae={tmp_path / 'nowhere'}"]) == 2
    assert "sae:" in capsys.readouterr().err
    _perfect_sae(tmp_path / "narrow", d=32)
    assert main(["evaluate-supervised", _write(tmp_path), f"sae={tmp_path / 'narrow'}"]) == 2
    assert "d_in=32 but site 'blocks.2.hook_resid_post' is 64 wide" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown config key 'edit_latent'"):
        from framework.study_config import load_study_config

        load_study_config(supervised.SupervisedConfig, _write(tmp_path), ["edit_latent=[1]"])
