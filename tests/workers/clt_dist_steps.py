"""Worker for tests/test_clt_distributed.py (run under torchrun): a cross-layer transcoder of
each kind over 3 stacked layers trained a few steps under each strategy, each rank on its slice
of the same global batches (AuxK on: dead latents after 32 tokens); rank 0 writes the whole
weights (and buffers: JumpReLU's controller state).

    python -m torch.distributed.run ... clt_dist_steps.py OUT_DIR STRATEGIES KINDS"""

import sys

import torch
from safetensors.torch import save_file

from framework.config import DistConfig, SAEConfig, TrainConfig
from framework.engine import Engine
from framework.sae_trainer import SAETrainer

out_dir, strategies, kinds = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
LAYERS, D, N, K, B, STEPS = 3, 8, 24, 3, 64, 6

g = torch.Generator().manual_seed(0)
dictionary = torch.randn(40, LAYERS * D, generator=g)
xs = [torch.randn(B, LAYERS * D, generator=g) + 0.5 for _ in range(STEPS)]
ys = [(torch.rand(B, 40, generator=g) < 0.1).float() @ dictionary + 0.3 * x for x in xs]

for kind in kinds:
    for strategy in strategies:
        engine = Engine(DistConfig(strategy=strategy), "cpu")
        rows = slice(engine.rank * B // engine.world, (engine.rank + 1) * B // engine.world)
        cfg = SAEConfig(name="c", kind=kind, n_latents=N, k=K, dead_after_tokens=32, aux_k=4, lr=1e-3,
                        options={"layers": [0, 1, 2]})
        tcfg = TrainConfig(warmup_steps=1, batch_size=B, total_tokens=B * STEPS)
        tr = SAETrainer(cfg, tcfg, "a", "b", {"a": LAYERS * D, "b": LAYERS * D}, STEPS, torch.device("cpu"), seed=3,
                        engine=engine)
        tr.init_from_sample(xs[0], ys[0], True, "mean")
        for x, y in zip(xs, ys):
            tr.step(x[rows], y[rows])
        weights = {k: v.detach().to("cpu").clone().contiguous() for k, v in tr.runner.whole_weights().items()}
        if engine.is_main:
            save_file(weights, f"{out_dir}/{kind}_{strategy}_w{engine.world}.safetensors")
engine.close()
