"""One tiny run shaped like configs/smollm2_transcoders.yaml (per-layer transcoders, skip
transcoders, a CLT, two replacement sets; tiny-gpt2, a few hundred tokens): the sets' metrics
land in eval.json and summary.json, every SAE's own training rate and memory in summary.json,
and `python -m framework.benchmarks.transcoder_table RUN_DIR` prints the comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from framework.benchmarks import transcoder_table
from framework.cli import main
from framework.kinds import build_sae

LAYERS, D, N, K = 4, 64, 32, 4  # tiny-gpt2
SETS = {"transcoders": [f"tc{L}" for L in range(LAYERS)], "skip_transcoders": [f"skip{L}" for L in range(LAYERS)]}


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_dir) -> Path:
    root = tmp_path_factory.mktemp("tables")
    tc = {"n_latents": N, "k": K}
    saes = [{"name": f"tc{L}", "site": f"blocks.{L}.resid_mid", "output_site": f"blocks.{L}.mlp_out", **tc}
            for L in range(LAYERS)]
    saes += [{**s, "name": f"skip{L}", "skip_connection": True} for L, s in enumerate(list(saes))]
    saes.append({"name": "clt", "kind": "clt", "options": {"layers": f"0-{LAYERS - 1}"}, **tc})
    cfg = {"run_dir": str(root / "run"), "model": {"name": "tiny-gpt2"},
           "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8}, "saes": saes,
           "train": {"total_tokens": 512, "batch_size": 128, "buffer_tokens": 256, "init_tokens": 128, "warmup_steps": 1},
           "eval": {"tokens": 256, "splice_tokens": 128, "replacement_sets": SETS},
           "log": {"progress": False, "tensorboard": False}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # rows in the config's order
    assert main(["train", str(path), "--quiet"]) == 0
    return root / "run"


def test_sets_are_reported_in_eval_json_and_the_summary(run):
    evals, summary = (json.loads((run / f).read_text()) for f in ("eval.json", "summary.json"))
    assert set(summary["replacement_sets"]) == set(SETS) and set(summary["saes"]) == set(evals) - set(SETS)
    for name, members in SETS.items():
        entry = evals[name]
        assert entry == summary["replacement_sets"][name] and entry["members"] == members
        assert entry["kl"] > 0 and entry["splice_tokens"] == summary["saes"]["tc0"]["splice_tokens"]
        assert entry["ce_zero_ablated"] == evals["clt"]["ce_zero_ablated"]  # the same MLPs ablated, same tokens


def test_every_sae_reports_its_own_rate_and_memory(run):
    training = json.loads((run / "summary.json").read_text())["sae_training"]
    assert list(training) == [*SETS["transcoders"], *SETS["skip_transcoders"], "clt"]
    for name, t in training.items():
        sae = (build_sae("clt", LAYERS * D, N, K, d_out=LAYERS * D, options={"layers": f"0-{LAYERS - 1}"})
               if name == "clt" else build_sae("topk", D, N, K, d_out=D, skip_connection=name.startswith("skip")))
        params = sum(p.numel() * 4 for p in sae.parameters())
        assert t["timed_steps"] == 4 and t["step_seconds"] > 0 and t["tokens_per_s"] > 0, name
        assert t["param_bytes"] == t["grad_bytes"] == params, name
        assert 2 * params <= t["optimizer_bytes"] <= 2 * params + 64 * len(list(sae.parameters())), name  # Adam
        assert t["state_bytes"] == t["param_bytes"] + t["grad_bytes"] + t["optimizer_bytes"]
    assert training["skip0"]["param_bytes"] - training["tc0"]["param_bytes"] == 4 * D * D  # W_skip


def test_the_table_printer(run, capsys):
    assert transcoder_table.main([str(run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "|  | " + " | ".join(f"FVU L{L}" for L in range(LAYERS)) + " | ΔCE | KL | L0/layer | dead | tok/s | MiB |"
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in lines[2:5]}
    assert list(rows) == ["transcoders", "skip_transcoders", "clt"]
    evals = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    for L in range(LAYERS):
        assert rows["transcoders"][1 + L] == f"{evals[f'tc{L}']['fvu']:.3f}"
        assert rows["clt"][1 + L] == f"{evals['clt'][f'fvu.layer{L}']:.3f}"
    assert rows["skip_transcoders"][5:7] == [f"{evals['skip_transcoders'][k]:.4f}" for k in ("delta_ce", "kl")]
    assert rows["clt"][5:8] == [f"{evals['clt']['delta_ce']:.4f}", f"{evals['clt']['kl']:.4f}",
                                f"{evals['clt']['l0'] / LAYERS:.1f}"]
    rate = 1 / sum(1 / summary["sae_training"][m]["tokens_per_s"] for m in SETS["transcoders"])
    assert rows["transcoders"][9] == f"{rate:,.0f}"
    mib = sum(summary["sae_training"][m]["state_bytes"] for m in SETS["skip_transcoders"]) / 2**20
    assert rows["skip_transcoders"][10] == f"{mib:,.1f}"
    assert "512 train tokens from one LLM forward" in out


def test_the_printer_refuses_an_unfinished_run(tmp_path, capsys):
    assert transcoder_table.main([str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err
