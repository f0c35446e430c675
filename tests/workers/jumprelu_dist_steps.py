"""Worker for tests/test_jumprelu.py (run under torchrun): a JumpReLU skip transcoder (L0
controller on) trained a few steps under each strategy, each rank on its slice of the same
global batches; every rank writes its whole state (gathered under ZeRO-3), so the test can
check that the replicas agree bit for bit (thresholds, lambda, W_skip).

    python -m torch.distributed.run ... jumprelu_dist_steps.py OUT_DIR STRATEGIES"""

import sys

import torch
from safetensors.torch import save_file

from framework.config import DistConfig, SAEConfig, TrainConfig
from framework.engine import Engine
from framework.sae_trainer import SAETrainer

out_dir, strategies = sys.argv[1], sys.argv[2].split(",")
D, D_OUT, N, K, B, STEPS = 12, 10, 48, 4, 64, 8

g = torch.Generator().manual_seed(0)
A, dictionary = torch.randn(D_OUT, D, generator=g) * 0.5, torch.randn(40, D_OUT, generator=g)
xs = [torch.randn(B, D, generator=g) + 0.5 for _ in range(STEPS)]
ys = [x @ A.T + (torch.rand(B, 40, generator=g) < 0.1).float() @ dictionary for x in xs]

for strategy in strategies:
    engine = Engine(DistConfig(strategy=strategy), "cpu")
    rows = slice(engine.rank * B // engine.world, (engine.rank + 1) * B // engine.world)
    cfg = SAEConfig(name="s", kind="jumprelu", site="a", output_site="b", n_latents=N, k=K, skip_connection=True,
                    options={"bandwidth": 0.2, "threshold_lr_scale": 5.0})
    tcfg = TrainConfig(warmup_steps=2, batch_size=B, total_tokens=B * STEPS)
    tr = SAETrainer(cfg, tcfg, "a", "b", {"a": D, "b": D_OUT}, STEPS, torch.device("cpu"), seed=3, engine=engine)
    tr.init_from_sample(xs[0], ys[0], True, "geometric_median")
    for x, y in zip(xs, ys):
        tr.step(x[rows], y[rows])
    state = tr.runner.whole_weights()  # collective under ZeRO-3
    save_file({k: v.contiguous() for k, v in state.items()}, f"{out_dir}/{strategy}_w{engine.world}_r{engine.rank}.safetensors")
engine.close()
