"""`python -m framework.benchmarks.train_step` runs the real training step and prints every
phase row (the figures themselves are for people to read, never asserted)."""

from framework.benchmarks import train_step


def test_quick_run_reports_every_phase(capsys):
    results = train_step.main(["--quick", "--settings", "1", "--rounds", "1", "--n", "1024"])
    text = capsys.readouterr().out
    for name in train_step.ROWS:
        assert name in text
    assert "step tokens/s" in text and "machine:" in text
    (row,) = results
    assert row["threads"] == 1 and all(row[name] > 0 for name in train_step.ROWS)
