"""Worker for tests/test_distributed.py (run under torchrun): trains one SAE for a few steps
with each strategy on the same global batches, each rank on its slice, and writes the final
weights and metrics from rank 0."""

import json
import sys

import torch
from safetensors.torch import save_file

from framework.config import DistConfig, SAEConfig, TrainConfig
from framework.engine import Engine
from framework.sae_trainer import SAETrainer

out_dir = sys.argv[1]
strategies = sys.argv[2].split(",")
D, N, K, B, STEPS = 12, 48, 3, 32, 6

g = torch.Generator().manual_seed(0)
dictionary = torch.randn(40, D, generator=g)
batches = [(torch.rand(B, 40, generator=g) < 0.1).float() @ dictionary + 0.5 for _ in range(STEPS)]
results = {}
for strategy in strategies:
    engine = Engine(DistConfig(strategy=strategy), "cpu")  # the process group is made once
    local = slice(engine.rank * B // engine.world, (engine.rank + 1) * B // engine.world)
    cfg = SAEConfig(name="s", site="a", n_latents=N, k=K, dead_after_tokens=B, aux_k=4)
    tcfg = TrainConfig(warmup_steps=2, grad_clip=1.0, batch_size=B, total_tokens=B * STEPS)
    tr = SAETrainer(cfg, tcfg, "a", "a", {"a": D}, STEPS, torch.device("cpu"), seed=3, engine=engine)
    tr.sae.init_from_sample(batches[0], batches[0], True, "geometric_median")
    for xb in batches:
        tr.step(xb[local], xb[local])
    metrics = tr.read_sums()
    with tr.evaluating() as sae:
        weights = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
    if engine.is_main:
        save_file(weights, f"{out_dir}/{strategy}_w{engine.world}.safetensors")
        results[strategy] = metrics
if engine.is_main:
    with open(f"{out_dir}/metrics_w{engine.world}.json", "w") as f:
        json.dump(results, f)
engine.close()
