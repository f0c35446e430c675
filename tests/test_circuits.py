"""Circuit discovery: per-head SAEs learn, codes and scores mean what they say, patching is the
same batched or one head at a time, and a planted circuit (only some heads carry any signal) is
found by both the SAE codes and patching, end to end through `sparsemill circuits`."""

import json

import pytest
import torch
import yaml

from framework import circuits, templates
from framework.cli import main
from framework.config import ConfigError, ModelConfig
from framework.llm import load_frozen

LIVE_HEAD = 1  # the planted circuit: this head of every layer; the others output exactly zero


@pytest.fixture(scope="module")
def planted():
    """tiny-gpt2 whose heads other than LIVE_HEAD have zero value projections (their output is 0)."""
    model, tok = load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"))
    d = model.config.n_embd
    dh = d // model.config.n_head
    with torch.no_grad():
        for block in model.transformer.h:
            for h in range(model.config.n_head):
                if h != LIVE_HEAD:
                    cols = slice(2 * d + h * dh, 2 * d + (h + 1) * dh)
                    block.attn.c_attn.weight[:, cols] = 0
                    block.attn.c_attn.bias[cols] = 0
    return model, tok


def _task(model, tok, n=10, seed=0) -> templates.Task:
    """Positives over letters a-h, negatives over s-z (same length); answer/distractor are the
    model's own top/bottom next token on the positive, so every positive counts as solved."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = [], []
    for i in range(n):
        a = "".join("abcdefgh"[j] for j in torch.randint(0, 8, (7,), generator=g).tolist())
        b = "".join("stuvwxyz"[j] for j in torch.randint(0, 8, (7,), generator=g).tolist())
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(a, add_special_tokens=False)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1, :256]
        ans, dis = tok.decode([int(logits.argmax())]), tok.decode([int(logits.argmin())])
        pos.append(templates.Example(a, ans, dis))
        neg.append(templates.Example(b, ans, dis))
    return templates.Task("planted", pos, neg)


def test_head_saes_learn_planted_dictionaries_and_train_independently():
    g = torch.Generator().manual_seed(0)
    groups, n, d = 3, 200, 16
    atoms = torch.randn(groups, 8, d, generator=g)
    codes = torch.rand(groups, n, 8, generator=g) * (torch.rand(groups, n, 8, generator=g) < 0.25)
    x = codes @ atoms
    saes = circuits.HeadSAEs(groups, d, n_latents=16, k=3, seed=1)
    fvu = saes.fit(x, steps=150, lr=2e-2)
    assert fvu.shape == (groups,) and (fvu < 0.25).all(), fvu
    # group 1 alone, from the same initial weights, ends where it ended trained beside the others
    alone = circuits.HeadSAEs(groups, d, n_latents=16, k=3, seed=1)
    x2 = x.clone()
    x2[0] = torch.randn(n, d, generator=g) * 5  # changing another head's data changes nothing for head 1
    fvu2 = alone.fit(x2, steps=150, lr=2e-2)
    assert abs(float(fvu2[1]) - float(fvu[1])) < 1e-3


def test_codes_and_unique_scores():
    values = torch.tensor([[[3.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])  # one head, three tokens, k=2
    indices = torch.tensor([[[5, 2], [5, 7], [1, 4]]])
    assert circuits.CODES["top1"](values, indices) == [[5, 5, -1]]
    assert circuits.CODES["active_set"](values, indices) == [[(2, 5), (-1, 5), (-1, -1)]]
    codes = [["a", "b", "c", "a"], ["a", "a", "a", "a"], ["x", "y", "z", "w"]]
    pos = torch.tensor([True, True, False, False])
    torch.testing.assert_close(circuits.unique_code_scores(codes, pos),
                               torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))


def test_ranking_metrics():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert circuits.spearman(a, a) == pytest.approx(1.0)
    assert circuits.spearman(a, -a) == pytest.approx(-1.0)
    torch.testing.assert_close(circuits.ranks(torch.tensor([5.0, 1.0, 5.0])), torch.tensor([2.5, 1.0, 2.5],
                                                                                          dtype=torch.float64))
    assert circuits.top_heads(torch.tensor([0.5, 0.9, 0.5, 0.1]), 2) == {1, 0}  # tie broken by head order
    pr = circuits.precision_recall(torch.tensor([0.9, 0.8, 0.1, 0.0]), truth={0, 2, 3}, n=2)
    assert pr == {"precision": 0.5, "recall": pytest.approx(1 / 3)}


def test_patching_batched_equals_one_head_at_a_time_and_dead_heads_have_no_effect(planted):
    model, tok = planted
    task = _task(model, tok, n=6)
    clean, corrupt = (templates.encode(side, tok) for side in (task.positive, task.negative))
    layers = [0, 1, 2, 3]
    batched = circuits.patching_effects(model, clean, corrupt, layers, "resample", batch_size=256)
    single = circuits.patching_effects(model, clean, corrupt, layers, "resample", batch_size=1)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    heads = model.config.n_head
    live = torch.tensor([i % heads == LIVE_HEAD for i in range(len(batched))])
    assert batched[~live].abs().max() < 1e-6  # patching a zero output with a zero output
    assert batched[live].abs().min() > 1e-4
    mean = circuits.patching_effects(model, clean, corrupt, layers, "mean")
    assert mean[~live].abs().max() < 1e-6 and mean[live].abs().max() > 1e-4


def _write(tmp_path, task: templates.Task, **over) -> str:
    (tmp_path / "task.json").write_text(json.dumps(task.to_json()))
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": "tiny-gpt2", "device": "cpu"},
           "task": str(tmp_path / "task.json"), "examples": 4, "sae": {"n_latents": 16, "k": 2, "steps": 60},
           "patching": {"examples": 6}, "ground_truth_heads": 4, "top_n": [4, 8]} | over
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "c.yaml")


def test_planted_circuit_end_to_end(tmp_path, planted, monkeypatch, capsys):
    model, tok = planted
    monkeypatch.setattr("framework.llm.load_frozen", lambda cfg, seed=0: (model, tok))
    path = _write(tmp_path, _task(model, tok, n=8))
    assert main(["circuits", path, "sae.seed=3"]) == 0
    assert "P/R@4" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "ranking.json").read_text())
    heads = model.config.n_head
    assert len(result["ranking"]) == 4 * heads and result["examples_per_side"] == 4
    by_head = {r["head"]: r for r in result["ranking"]}
    live = [f"{layer}.{LIVE_HEAD}" for layer in range(4)]
    dead = [h for h in by_head if h not in live]
    assert all(by_head[h]["score"] == 0.0 for h in dead)  # a constant code is never unique to positives
    assert min(by_head[h]["score"] for h in live) > 0
    assert sorted(r["head"] for r in result["ranking"][:4]) == sorted(live)
    assert set(result["ground_truth"]["circuit"]) == set(live)
    assert result["recovery"]["sae_codes"]["top4"] == {"precision": 1.0, "recall": 1.0}
    assert {"sae_method", "load_model"} <= set(result["timing_s"])
    assert {"same_examples", "ground_truth"} <= set(result["timing_patching_s"])


def test_bad_inputs_fail_early_naming_the_problem(tmp_path, planted, monkeypatch, capsys):
    model, tok = planted
    monkeypatch.setattr("framework.llm.load_frozen", lambda cfg, seed=0: (model, tok))
    task = _task(model, tok, n=4)
    data = task.to_json()
    del data["positive"][2]["distractor"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"positive\[2\]: missing or empty field\(s\) \['distractor'\]"):
        templates.load_task(tmp_path / "bad.json")
    path = _write(tmp_path, task)
    assert main(["circuits", path, "positions=middle"]) == 2
    assert "positions: 'middle' is not one of ['all', 'last']" in capsys.readouterr().err
    assert main(["circuits", path, "examples=9"]) == 2
    assert "only 4 pairs" in capsys.readouterr().err
    assert main(["circuits", path, "layers=[7]"]) == 2
    assert "layers: [7] out of range" in capsys.readouterr().err
    assert main(["circuits", path, "sae.nlatents=3"]) == 2
    assert "did you mean 'n_latents'" in capsys.readouterr().err


def test_templates_pair_and_label_consistently():
    ioi = templates.TASKS["ioi"](8, 0)
    for p, q in zip(ioi.positive, ioi.negative):
        io, s = p.attributes["io"], p.attributes["s"]
        assert p.answer == " " + io and p.distractor == " " + s
        assert p.prompt.count(s) == 2 and p.prompt.count(io) == 1  # ABB / BAB: the subject repeats
        assert q.attributes["s"] not in (io, s) and q.prompt.count(io) == 1  # ABC: no repeat
        first = p.prompt.index(io) < p.prompt.index(s)
        assert first == (p.attributes["order"] == "ABB")
    doc = templates.TASKS["docstring"](8, 0)
    for p, q in zip(doc.positive, doc.negative):
        assert p.answer in p.prompt and p.answer not in q.prompt and q.distractor in q.prompt
