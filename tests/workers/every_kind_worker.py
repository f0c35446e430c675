"""Worker for tests/test_distributed.py (run under torchrun, or alone): every registered SAE
kind trained a few steps under each strategy, each rank on its slice of the same global
batches; rank 0 writes the final weights `<strategy>_<kind>_w<world>.safetensors`.

    python -m torch.distributed.run ... every_kind_worker.py OUT_DIR STRATEGIES [--preinit]

--preinit creates the process group before the engine (as a caller embedding sparsemill
would), which the engine must accept."""

import argparse

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from framework.config import DistConfig, SAEConfig, TrainConfig
from framework.engine import Engine
from framework.kinds import SAE_KINDS
from framework.sae_trainer import SAETrainer

parser = argparse.ArgumentParser()
parser.add_argument("out_dir")
parser.add_argument("strategies")
parser.add_argument("--preinit", action="store_true")
args = parser.parse_args()
D, N, K, B, STEPS = 12, 48, 3, 32, 4

g = torch.Generator().manual_seed(0)
dictionary = torch.randn(40, D, generator=g)
batches = [(torch.rand(B, 40, generator=g) < 0.1).float() @ dictionary + 0.5 for _ in range(STEPS)]
lm_grads = [torch.randn(B, D, generator=g) for _ in range(STEPS)]  # gsae's d(LM loss)/d(activation)

if args.preinit:
    dist.init_process_group("gloo")
for strategy in args.strategies.split(","):
    engine = Engine(DistConfig(strategy=strategy), "cpu")
    rows = torch.arange(engine.rank * B // engine.world, (engine.rank + 1) * B // engine.world)
    for kind in sorted(k for k in SAE_KINDS if not SAE_KINDS[k].cross_layer):  # clt: clt_dist_steps.py
        cfg = SAEConfig(name=kind, site="a", kind=kind, n_latents=N, k=K, dead_after_tokens=B, aux_k=4, lr=1e-3)
        tcfg = TrainConfig(warmup_steps=1, batch_size=B, total_tokens=B * STEPS)
        tr = SAETrainer(cfg, tcfg, "a", "a", {"a": D}, STEPS, torch.device("cpu"), seed=3, engine=engine)
        tr.init_from_sample(batches[0], batches[0], True, "mean")
        for xb, grad in zip(batches, lm_grads):
            tr.step(xb[rows], xb[rows], grad[rows] if tr.sae.needs_lm_grad else None)
        weights = {k: v.detach().to("cpu").clone().contiguous() for k, v in tr.runner.whole_weights().items()}
        if engine.is_main:
            save_file(weights, f"{args.out_dir}/{strategy}_{kind}_w{engine.world}.safetensors")
engine.close()
