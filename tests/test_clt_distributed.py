"""A cross-layer transcoder trained on 2 ranks (ddp, ZeRO-2, ZeRO-3) trains the weights one
process trains, within float tolerance (tests/workers/clt_dist_steps.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "workers" / "clt_dist_steps.py"
STRATEGIES = ["ddp", "zero2", "zero3"]  # zero1 shares zero2's code path (and the time budget)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clt_dist")
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
               str(out), ",".join(STRATEGIES)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_train_what_one_trains(runs, strategy):
    one, two = (load_file(str(runs / f"{strategy}_w{w}.safetensors")) for w in (1, 2))
    assert {"decoders.0", "decoders.2", "encoder_weight"} <= set(one) and set(one) == set(two)
    moved = load_file(str(runs / f"{strategy}_w1.safetensors"))["encoder_bias"].abs().max()
    assert moved > 0  # the steps changed the weights (the comparison is not of two initialisations)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=f"{strategy}.{name}")
