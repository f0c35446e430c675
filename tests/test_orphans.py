"""No orphans: a training's workers never outlive their launcher, never wait forever for a
stop signal, and two trainings never share a run directory.

  - kill -9 of `launch/single_node.sh`'s process group (the script and torchrun; the workers
    have their own sessions) mid-run, mid-checkpoint (SPARSEMILL_SAVE_DELAY) and mid-evaluation
    (SPARSEMILL_EVAL_DELAY): no worker is left after GONE_S; the rerun resumes to the
    uninterrupted run's weights, bit for bit, and takes over the dead run's lock with a warning;
  - a second training on a run directory in use is refused, naming the holder;
  - SIGTERM to a rank that never reaches a step boundary: it exits after dist.timeout_s anyway;
  - the run-directory lock itself (framework/run_lock.py): holders, stale locks, reused pids,
    holders on other hosts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from launching import (ROOT, Job, endless, env_of, final_weights, finish, kill_marked, latest_step, marked_pids,
                       new_marker, one_node, saving, script_env, tiny_args, wait_for, wait_running)

from framework import checkpoint, run_lock
from framework.preemption import PREEMPTED_EXIT_CODE
from framework.errors import ConfigError
from framework.run_lock import RunLock, RunLockError

GONE_S = 60  # after the launcher's process group is killed, its workers end within this (here: ~1 s)


def _kill_and_count(job: Job, marker: str, what: str) -> str:
    before = len(marked_pids(marker))
    job.kill_group()
    started = time.monotonic()
    wait_for(lambda: not marked_pids(marker), GONE_S, f"every worker to end after the launcher was killed {what}")
    return f"{what}: {before} processes -> 0 in {time.monotonic() - started:.1f} s"


@pytest.mark.slow
def test_killed_launcher_leaves_no_worker_and_the_rerun_resumes_bitwise(tmp_path, text_dir, one_node_run):
    run, marker, jobs, report = tmp_path / "run", new_marker(), [], []
    root = run / "checkpoints"
    try:
        # mid-run; meanwhile a second training on the same run directory is refused
        jobs = [one_node(endless(run, text_dir), tmp_path / "mid_run.log", marker, SPARSEMILL_SAVE_DELAY="0.05")]
        wait_running(jobs, lambda: latest_step(run), 300, "the first checkpoint")
        holder = next(p for p in marked_pids(marker) if env_of(p, "RANK") == "0")
        second = subprocess.run([sys.executable, "-m", "framework", "train", *tiny_args(run, text_dir)], cwd=ROOT,
                                env=script_env(marker), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"is in use by another training: pid {holder} on host" in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        report.append(_kill_and_count(jobs[0], marker, "mid-run"))

        # mid-checkpoint: killed while the workers write the first checkpoint after the resume
        start, launched = latest_step(run), time.time()  # the killed job wrote nothing since
        jobs = [one_node(endless(run, text_dir), tmp_path / "mid_save.log", marker, SPARSEMILL_SAVE_DELAY="0.5")]
        wait_running(jobs, lambda: saving(run, start, launched), 300, "a checkpoint being written")
        report.append(_kill_and_count(jobs[0], marker, "mid-checkpoint"))
        assert "taking over the stale lock of pid" in jobs[0].text()
        for path in checkpoint.list_checkpoints(root):
            checkpoint.verify(path)

        # mid-evaluation
        jobs = [one_node(endless(run, text_dir), tmp_path / "mid_eval.log", marker, SPARSEMILL_EVAL_DELAY="600")]
        wait_running(jobs, lambda: "SPARSEMILL_EVAL_DELAY: pausing 600 s in the evaluation" in jobs[0].text(), 300,
                     "an evaluation")
        report.append(_kill_and_count(jobs[0], marker, "mid-eval"))

        jobs = [one_node(tiny_args(run, text_dir), tmp_path / "rerun.log", marker)]
        finish(jobs)
        assert "resuming from" in jobs[0].text()
        resumed, reference = final_weights(run), final_weights(one_node_run)
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), key
        print("launcher killed (kill -9 of its process group):", "; ".join(report))
    finally:
        for job in jobs:
            job.close()
        kill_marked(marker)


@pytest.mark.slow
def test_sigterm_ends_a_rank_that_never_reaches_a_step_boundary(tmp_path, text_dir):
    """The stop flag is honoured at a step boundary; a rank stuck before one (here: an
    evaluation that never ends) exits dist.timeout_s after the signal, saying where it was."""
    marker = new_marker()
    args = tiny_args(tmp_path / "run", text_dir, extra=["dist.timeout_s=5"])
    job = Job([sys.executable, "-m", "framework", "train", *args], tmp_path / "stuck.log",
              script_env(marker, SPARSEMILL_EVAL_DELAY="600"))
    try:
        wait_running([job], lambda: "pausing 600 s in the evaluation" in job.text(), 300, "an evaluation")
        job.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert job.wait(60) == PREEMPTED_EXIT_CODE, job.text()[-3000:]
        print(f"SIGTERM while stuck: exited {time.monotonic() - started:.1f} s later (dist.timeout_s=5)")
        assert "stop requested by SIGTERM 5 s ago (dist.timeout_s)" in job.text()
        assert "it is in an evaluation after step 8" in job.text() and "Traceback" not in job.text()
    finally:
        job.close()
        kill_marked(marker)


# --------------------------------------------------------------------------- the lock itself


def _holder(path) -> dict:
    return json.loads((path / run_lock.LOCK_NAME).read_text())


def _plant(run_dir, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / run_lock.LOCK_NAME).write_text(json.dumps({**run_lock.describe_self(), **holder}))


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path / "run", rank=0):
        holder = _holder(tmp_path / "run")
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(RunLockError, match=f"is in use by another training: pid {os.getpid()} on host .*it holds "
                                               "the lock"):
            RunLock(tmp_path / "run", rank=0).acquire()
    assert (tmp_path / "run" / run_lock.LOCK_NAME).read_text() == ""  # released: no holder, no warning next time
    with RunLock(tmp_path / "run", rank=1):  # only rank 0 locks
        assert (tmp_path / "run" / run_lock.LOCK_NAME).read_text() == ""


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(tmp_path, pid=int(dead.stdout), process_start=1)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, rank=0):
        assert _holder(tmp_path)["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {int(dead.stdout)}" in caplog.text and "no longer runs" in caplog.text


def test_without_flock_a_live_holder_is_refused_and_a_reused_pid_is_not(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(RunLock, "_flock", lambda self, fd: None)  # e.g. Lustre without flock
    _plant(tmp_path)  # this very process: alive
    with pytest.raises(RunLockError, match="still running on this host"):
        RunLock(tmp_path, rank=0).acquire()
    _plant(tmp_path, process_start=run_lock.describe_self()["process_start"] - 1)  # same pid, another process
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, rank=0):
        pass
    assert "now belongs to another process" in caplog.text


def test_a_holder_on_another_host_counts_while_it_refreshes_the_lock(tmp_path, monkeypatch, caplog):
    """flock may be node-local on a shared filesystem: a holder elsewhere is alive while it
    touches the lock file, and taken over once it stops."""
    monkeypatch.setattr(run_lock, "REFRESH_S", 0.2)
    _plant(tmp_path, host="elsewhere", boot_id="another-kernel", pid=1)
    lock_file, stop = tmp_path / run_lock.LOCK_NAME, threading.Event()

    def refresh():
        while not stop.wait(0.1):
            os.utime(lock_file)

    toucher = threading.Thread(target=refresh)
    toucher.start()
    try:
        with pytest.raises(RunLockError, match="pid 1 on host elsewhere.*keeps refreshing the lock"):
            RunLock(tmp_path, rank=0).acquire()
    finally:
        stop.set()
        toucher.join()
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, rank=0):
        pass
    assert "stopped refreshing the lock" in caplog.text


def test_an_unusable_run_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="run_dir: cannot write to '.*file'.*train.lock could not be created"):
        RunLock(tmp_path / "file", rank=0).acquire()
