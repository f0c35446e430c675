"""framework.benchmarks.optimizer_study's time-to-FVU marks, on the smoke-sized study."""

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
