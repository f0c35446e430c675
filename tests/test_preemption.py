"""SIGTERM / SIGUSR1 -> checkpoint at the next step, exit code 75; rerunning resumes."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from framework.preemption import PREEMPTED_EXIT_CODE


def _config(tmp_path, text_dir, total_tokens):
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "tiny-gpt2"},
        "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8},
        "saes": [{"name": "s", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4}],
        "train": {"total_tokens": total_tokens, "batch_size": 128, "buffer_tokens": 512, "init_tokens": 256},
        "eval": {"tokens": 256, "splice_tokens": 64},
        "log": {"progress": False, "every_steps": 1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_both_signals_set_the_flag():
    import os

    from framework.preemption import PreemptionFlag

    class _Alone:
        world, device = 1, "cpu"

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        flag = PreemptionFlag()
        assert not flag.should_stop(_Alone())
        os.kill(os.getpid(), sig)
        assert flag.should_stop(_Alone()) and flag.signal == sig
        flag.close()


@pytest.mark.slow
def test_signal_checkpoints_exits_75_and_resumes(tmp_path, text_dir, sig=signal.SIGUSR1):
    path = _config(tmp_path, text_dir, total_tokens=10_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "framework", "train", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "run" / "tensorboard"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.exists() and any(f.stat().st_size > 200 for f in events.iterdir())):
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert "preempted" in err
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tmp_path / "run" / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] > 0

    # rerun with a budget just past the preemption point: it resumes instead of starting over
    target = state["tokens"] + 3 * 128
    path = _config(tmp_path, text_dir, total_tokens=target)
    done = subprocess.run([sys.executable, "-m", "framework", "train", str(path), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and "the data stream continues where it stopped" in done.stderr
    assert "train.total_tokens: 10000000 -> " in done.stderr  # the changed budget is reported, not refused
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == state["step"] + 3 and summary["tokens"] == target
