"""framework.benchmarks.optimizer_study's time-to-FVU marks, on the smoke-sized study."""

import math

import torch

from framework.benchmarks import optimizer_study


def test_time_to_fvu_marks_are_reported_and_bounded(capsys):
    results = optimizer_study.main(["--quick", "--budgets", "16384", "--adam-lrs", "2e-3", "--sf-lrs", "5e-3",
                                    "--fvu-marks", "1.5,0.0", "--mark-every", "4", "--mark-tokens", "1024",
                                    "--threads", "1"])
    assert [r["optimizer"] for r in results] == ["adam", "signsgd_schedulefree"]
    for r in results:
        t, tokens = r["time_to_fvu"]["1.5"], r["tokens_to_fvu"]["1.5"]
        assert 0 < t <= r["seconds"] and tokens % 1024 == 0 and 0 < tokens <= 16384  # FVU <= 1.5: the first check
        assert r["time_to_fvu"]["0.0"] is None and r["tokens_to_fvu"]["0.0"] is None  # never reached
    out = capsys.readouterr().out
    assert "t(FVU<=1.5)" in out and "t(FVU<=0.0)" in out


def test_real_activation_rows_run_without_a_dictionary(monkeypatch, capsys):
    """--data smollm2 trains on the real stream's rows and evaluates on held-out ones (here a
    stand-in for the LLM source: low-rank rows, so an SAE can fit them), with no feature recovery."""
    asked = []

    def rows(n, split="train"):
        asked.append((n, split))
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        return torch.randn(n, 8, generator=g) @ torch.randn(8, 48, generator=torch.Generator().manual_seed(2))

    monkeypatch.setattr(optimizer_study, "smollm2_rows", rows)
    results = optimizer_study.main(["--data", "smollm2", "--n-latents", "256", "--k", "8", "--budgets", "8192",
                                    "--batch-size", "512", "--init-tokens", "1024", "--eval-tokens", "2048",
                                    "--adam-lrs", "2e-3", "--sf-lrs", "", "--fvu-marks", "0.9",
                                    "--mark-every", "2", "--mark-tokens", "512", "--threads", "1"])
    assert asked == [(8192 + 512, "train"), (2048, "eval")]
    (r,) = results
    assert math.isnan(r["mean_max_cos"]) and math.isnan(r["recovered_0.9"])
    assert r["fvu"] < 0.5 and r["time_to_fvu"]["0.9"] is not None  # it learned the 8-dim structure
    assert "held-out tokens" in capsys.readouterr().out
