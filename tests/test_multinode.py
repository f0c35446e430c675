"""Two nodes for real: two `launch/multi_node.sh --nnodes 2` invocations (one CPU process each)
joined by torchrun's c10d rendezvous, each in its own network namespace with its own host name
when the test runs as root (tests/launching.Nodes; otherwise both on loopback, and it says so).

  - with ddp and with ZeRO-2 they train the weights one node trains with the same global batch
    (launch/single_node.sh, 2 processes, ddp; the reduction order may differ, so within 1e-6;
    measured here: equal);
  - kill -9 of one node's launcher process group mid-run: the other node exits non-zero within
    LOST_NODE_S, naming the lost rank, and no process of the job is left;
  - one node frozen (SIGSTOP of all its processes) while it writes its part of a checkpoint:
    the other exits after dist.timeout_s (20 s here) naming the wait and the silent rank or
    store, instead of hanging;
  - rerunning both nodes resumes from the last checkpoint to the uninterrupted run's weights,
    bit for bit.
Measured times are printed (pytest -s).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from launching import (Nodes, endless, env_of, final_weights, finish, kill_marked, latest_step, marked_pids,
                       max_difference, new_marker, saving, tiny_args, wait_for, wait_running)

pytestmark = pytest.mark.slow

LOST_NODE_S = 120  # generous: the survivor needs ~10 s here
FROZEN_NODE_S = 120  # dist.timeout_s=20, 1.5x that for the stall watch, the heartbeat probe, torchrun's teardown
GONE_S = 60  # after a launcher's process group is killed, its workers end within this


@pytest.fixture(scope="module")
def nodes():
    pair = Nodes()
    if not pair.isolated:
        print(f"test_multinode: {pair.why}")
    yield pair
    pair.close()


def _two_nodes(nodes: Nodes, args: list[str], folder, marker: str, name: str, env1=None):
    return [nodes.launch(n, args, folder / f"{name}.node{n}.log", marker, **(env1 if n == 1 and env1 else {}))
            for n in (0, 1)]


@pytest.fixture(scope="module")
def two_node_runs(nodes, text_dir, tmp_path_factory):
    """strategy -> the run directory of an uninterrupted two-node run, made on first use."""
    root, done = tmp_path_factory.mktemp("two_nodes"), {}

    def get(strategy: str):
        if strategy not in done:
            marker = new_marker()
            try:
                started = time.monotonic()
                finish(_two_nodes(nodes, tiny_args(root / strategy, text_dir, extra=[f"dist.strategy={strategy}"]),
                                  root, marker, strategy))
                print(f"two nodes, {strategy}: {time.monotonic() - started:.0f} s")
            finally:
                kill_marked(marker)
            done[strategy] = root / strategy
        return done[strategy]

    return get


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_nodes_train_what_one_node_trains(nodes, two_node_runs, one_node_run, strategy):
    """Against one node's ddp run for both: ZeRO-2 trains what ddp trains (tests/test_distributed.py)."""
    two, one = two_node_runs(strategy), one_node_run
    diff = max_difference(final_weights(one), final_weights(two))
    print(f"{strategy}: max |w(2 nodes x 1, {strategy}) - w(1 node x 2, ddp)| = {diff:.3g} "
          f"({'namespaces' if nodes.isolated else 'loopback'})")
    assert diff <= 1e-6
    assert '"world_size": 2' in (two / "summary.json").read_text()


def _rank_on(marker: str, node: int) -> int:
    """The global rank of `node`'s worker (c10d assigns node ranks, not --node_rank)."""
    def find():
        for pid in marked_pids(marker, node):
            rank = env_of(pid, "RANK")
            if rank is not None:
                return rank
        return None

    return int(wait_for(find, 300, f"node {node}'s worker"))


def _all_gone(marker: str, what: str) -> float:
    started = time.monotonic()
    wait_for(lambda: not marked_pids(marker), GONE_S, f"every process of the job to end {what}")
    return time.monotonic() - started


def test_lost_or_frozen_node_stops_the_other_and_both_resume(nodes, two_node_runs, tmp_path, text_dir):
    run, marker, jobs = tmp_path / "run", new_marker(), []
    try:
        # 1. kill -9 of node 1's launcher process group mid-run
        jobs = _two_nodes(nodes, endless(run, text_dir), tmp_path, marker, "lost", {"SPARSEMILL_SAVE_DELAY": "0.05"})
        wait_running(jobs, lambda: latest_step(run), 300, "the first checkpoint")
        processes = len(marked_pids(marker))
        jobs[1].kill_group()
        started = time.monotonic()
        assert jobs[0].wait(LOST_NODE_S) != 0
        lost_s = time.monotonic() - started
        _blames_node1(jobs[0].text(), "a connection to another rank closed", nodes)
        gone_s = _all_gone(marker, "after node 1 was killed")
        print(f"node 1 killed: node 0 exited non-zero after {lost_s:.1f} s; processes {processes} -> 0 "
              f"within {lost_s + gone_s:.1f} s")

        # 2. node 1 frozen while it writes its part of a checkpoint
        start, launched = latest_step(run), time.time()  # the killed job wrote nothing since
        jobs = _two_nodes(nodes, endless(run, text_dir), tmp_path, marker, "frozen", {"SPARSEMILL_SAVE_DELAY": "0.5"})
        rank = _rank_on(marker, 1)
        wait_running(jobs, lambda: saving(run, start, launched, f"rank_{rank:05d}.safetensors"), 300,
                     "node 1 writing its part of a checkpoint")
        for pid in marked_pids(marker, 1):
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        assert jobs[0].wait(FROZEN_NODE_S) != 0
        frozen_s = time.monotonic() - started
        _blames_node1(jobs[0].text(), "dist.timeout_s=20", nodes)
        jobs[1].kill_group()
        _all_gone(marker, "after frozen node 1 was killed")
        print(f"node 1 frozen: node 0 exited non-zero after {frozen_s:.1f} s (dist.timeout_s=20)")

        # 3. both rerun to the end: the uninterrupted run's weights, bit for bit
        jobs = _two_nodes(nodes, tiny_args(run, text_dir), tmp_path, marker, "rerun")
        finish(jobs)
        assert "resuming from" in jobs[0].text() + jobs[1].text()
        resumed, reference = final_weights(run), final_weights(two_node_runs("ddp"))
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), key
    finally:
        for job in jobs:
            job.close()
        kill_marked(marker)


def _blames_node1(log: str, reason: str, nodes: Nodes) -> None:
    """Node 0's message gives `reason` and names what is missing: node 1's rank, or the job's
    store when node 1's agent held it (by host name when the nodes have their own)."""
    message = log.split("sparsemill rank ")[-1].splitlines()[0]
    assert reason in message, log[-3000:]
    assert "Not answering" in message or "store at" in message, log[-3000:]
    if nodes.isolated:
        assert nodes.HOSTS[1] in message.split(reason)[-1], log[-3000:]
