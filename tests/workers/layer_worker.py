"""Worker for tests/test_distributed.py (torchrun, or alone): layer-distributed SAEs. Every rank
produces its own rows of two sites per LLM batch; `framework.routing.route` sends each site to the
rank owning its SAE, which trains it whole. Alone, one process trains both SAEs on the rows of
all ranks in rank order, the global batch the owners receive. Writes each SAE's final weights.

    python -m torch.distributed.run ... layer_worker.py OUT_DIR      (or: python layer_worker.py OUT_DIR)
"""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from framework.config import SAEConfig, TrainConfig
from framework.routing import RoutedSource, assign_owners
from framework.sae_trainer import SAETrainer

out_dir = sys.argv[1]
D, N, K, ROWS, STEPS, SIM_RANKS = 10, 40, 3, 16, 5, 2
SITES = {"s0": "blocks.0.resid_post", "s1": "blocks.1.mlp_out"}


def rank_batches(r: int) -> list[dict]:
    """Rank r's local rows per LLM batch (different data on every rank)."""
    g = torch.Generator().manual_seed(100 + r)
    return [{site: torch.randn(ROWS, D, generator=g) + i for i, site in enumerate(SITES.values())}
            for _ in range(STEPS)]


class ListSource:
    dims = {site: D for site in SITES.values()}
    device = torch.device("cpu")

    def __init__(self, batches):
        self.items = batches

    def batches(self, split="train"):
        return iter(self.items)


def trainer(name: str) -> SAETrainer:
    cfg = SAEConfig(name=name, site=SITES[name], n_latents=N, k=K, dead_after_tokens=2 * ROWS, aux_k=4)
    tcfg = TrainConfig(warmup_steps=1, batch_size=ROWS * SIM_RANKS, total_tokens=ROWS * SIM_RANKS * STEPS)
    return SAETrainer(cfg, tcfg, SITES[name], SITES[name], {SITES[name]: D}, STEPS, torch.device("cpu"),
                      seed=list(SITES).index(name))


distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == SIM_RANKS
    owners = assign_owners(list(SITES), world)
    sites_of_rank = [[SITES[n] for n in SITES if owners[n] == r] for r in range(world)]
    stream = RoutedSource(ListSource(rank_batches(rank)), sites_of_rank, rank, world).batches()
    mine = [n for n in SITES if owners[n] == rank]
else:
    rank, mine = 0, list(SITES)
    per_rank = [rank_batches(r) for r in range(SIM_RANKS)]
    stream = ({s: torch.cat([per_rank[r][i][s] for r in range(SIM_RANKS)]) for s in SITES.values()}
              for i in range(STEPS))

trainers = {n: trainer(n) for n in mine}
for step, batch in enumerate(stream):
    for n, tr in trainers.items():
        x = batch[SITES[n]]
        if step == 0:
            tr.init_from_sample(x, x, True, "geometric_median")
        tr.step(x, x)
for n, tr in trainers.items():
    save_file({k: v.contiguous() for k, v in tr.sae.state_dict().items()},
              f"{out_dir}/{n}_{'routed' if distributed else 'alone'}.safetensors")
if distributed:
    dist.barrier()  # no rank tears down gloo while a peer still talks to it
    dist.destroy_process_group()
