"""Worker for tests/test_state.py (under torchrun, 2 ranks): rank 1's checkpoint write fails
with an exception that is no OSError (a bug, not a full disk). Both ranks must leave the
save with a CheckpointError naming it, none waiting at the agreement step; each rank writes
what it caught to OUT/rank<R>.txt.

    python -m torch.distributed.run ... save_failure_worker.py CONFIG OUT_DIR"""

import sys
from pathlib import Path

import torch.distributed as dist

from framework import durable
from framework.config import load_config
from framework.errors import CheckpointError
from framework.train import train

config, out = sys.argv[1], Path(sys.argv[2])
real_write = durable.write_file


def broken_write(path, data):
    if path.name == "rank_00001.json":
        raise TypeError("planted bug: object of type Tensor is not JSON serializable")
    real_write(path, data)


durable.write_file = broken_write
rank = int(__import__("os").environ["RANK"])
try:
    train(load_config(config))
    caught = "no error"
except CheckpointError as err:
    caught = f"CheckpointError: {err}"
(out / f"rank{rank}.txt").write_text(caught)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
