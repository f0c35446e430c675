"""Worker for tests/test_distributed.py (run under torchrun): trains one SAE for a few steps
with each strategy and gradient-accumulation setting on the same global batches, each rank on
its slice of every micro-batch, and writes the final weights and metrics from rank 0.

    python -m torch.distributed.run ... dist_sae_steps.py OUT_DIR STRATEGIES ACCUMULATIONS

Under DDP it also counts the reducer's gradient all-reduces (a counting comm hook), per
optimizer step, to show that inner micro-steps do not synchronise."""

import json
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from framework.config import DistConfig, SAEConfig, TrainConfig
from framework.engine import Engine
from framework.runners import DDPRunner
from framework.sae_trainer import SAETrainer

out_dir = sys.argv[1]
strategies = sys.argv[2].split(",")
accumulations = [int(a) for a in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1]
D, N, K, B, STEPS = 12, 48, 3, 32, 6

g = torch.Generator().manual_seed(0)
dictionary = torch.randn(40, D, generator=g)
batches = [(torch.rand(B, 40, generator=g) < 0.1).float() @ dictionary + 0.5 for _ in range(STEPS)]


def local_rows(rank: int, world: int, accumulation: int) -> torch.Tensor:
    """This rank's rows of a global batch: its 1/world of each of the micro-batches, in order."""
    micro = B // accumulation
    return torch.cat([torch.arange(m * micro + rank * micro // world, m * micro + (rank + 1) * micro // world)
                      for m in range(accumulation)])


def counting_hook(counter: list, bucket):
    counter[0] += 1
    return allreduce_hook(None, bucket)


results = {}
for strategy in strategies:
    engine = Engine(DistConfig(strategy=strategy), "cpu")  # the process group is made once
    for accumulation in accumulations:
        rows = local_rows(engine.rank, engine.world, accumulation)
        cfg = SAEConfig(name="s", site="a", n_latents=N, k=K, dead_after_tokens=B, aux_k=4)
        tcfg = TrainConfig(warmup_steps=2, grad_clip=1.0, batch_size=B, total_tokens=B * STEPS,
                           grad_accumulation_steps=accumulation)
        tr = SAETrainer(cfg, tcfg, "a", "a", {"a": D}, STEPS, torch.device("cpu"), seed=3, engine=engine)
        tr.init_from_sample(batches[0], batches[0], True, "geometric_median")
        reducer_calls = [0]
        if isinstance(tr.runner, DDPRunner):
            tr.runner.wrapped.register_comm_hook(reducer_calls, counting_hook)
        for xb in batches:
            tr.step(xb[rows], xb[rows])
        metrics = tr.read_sums()
        metrics["reducer_calls_per_step"] = reducer_calls[0] / STEPS
        with tr.evaluating() as sae:
            weights = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
        if engine.is_main:
            save_file(weights, f"{out_dir}/{strategy}_a{accumulation}_w{engine.world}.safetensors")
            results[f"{strategy}_a{accumulation}"] = metrics
if engine.is_main:
    with open(f"{out_dir}/metrics_w{engine.world}.json", "w") as f:
        json.dump(results, f)
engine.close()
