"""Gradient accumulation in one process: an optimizer step over A micro-batches is the step of
the exact mean of their losses (each normalised by its own micro-batch), with AuxK active,
clipping applied to the mean gradient, and the firing counters updated once from all tokens."""

import pytest
import torch

from framework.config import ConfigError, SAEConfig, TrainConfig, load_config
from framework.sae_trainer import SAETrainer, annealed_k

D, N, K, B = 10, 40, 3, 24


def _trainer(accumulation: int) -> SAETrainer:
    cfg = SAEConfig(name="s", site="a", n_latents=N, k=K, aux_k=4, dead_after_tokens=10**6)
    tcfg = TrainConfig(batch_size=B, total_tokens=B * 4, warmup_steps=0, grad_clip=0.05,
                       grad_accumulation_steps=accumulation)
    return SAETrainer(cfg, tcfg, "a", "a", {"a": D}, 4, torch.device("cpu"), seed=1)


def _batch(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g) * 2 + 0.3


@pytest.mark.parametrize("accumulation", [2, 3])
def test_accumulated_step_is_the_step_of_the_mean_micro_batch_loss(accumulation):
    x = _batch(0)
    trainers = [_trainer(accumulation), _trainer(1)]
    for tr in trainers:
        tr.init_from_sample(x, x, True, "mean")
        tr.tokens_since_fired[: N // 2] = 10**7  # half the latents dead: AuxK runs
    acc, ref = trainers
    metrics = acc.step(x, x)

    # reference: the same objective on each micro-batch, one backward of the mean, one step
    runner, k = ref.runner, annealed_k(ref.cfg, 0, ref.total_steps)
    dead = ref.dead_mask().nonzero().squeeze(1)
    parts = [ref.runner.objective(xm, xm, k, dead) for xm in x.split(B // accumulation)]
    (sum(p[0] for p in parts) / accumulation).backward()
    runner.step()
    with torch.no_grad():
        ref.sae.renorm_decoder()

    for name, value in acc.sae.state_dict().items():
        torch.testing.assert_close(value, ref.sae.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(metrics.aux_loss) > 0
    assert float(metrics.fvu) == pytest.approx(float(sum(p[1] for p in parts)) / accumulation, rel=1e-6)
    fired = sum(torch.bincount(p[3].indices[p[3].values != 0], minlength=N) for p in parts)
    assert torch.equal(acc.fire_counts, fired)  # counted once per step, from every micro-batch
    assert float(metrics.l0) == pytest.approx(float(fired.sum()) / B)
    assert (acc.tokens_since_fired[fired == 0] >= B).all() and (acc.tokens_since_fired[fired > 0] == 0).all()


def test_batch_must_split_into_micro_batches(tmp_path):
    base = [f"data.activations_dir={tmp_path}", "data.source=activations", "saes=[{name: s}]"]
    with pytest.raises(ConfigError, match="not divisible by train.grad_accumulation_steps=3"):
        load_config(None, [*base, "train.batch_size=1024", "train.grad_accumulation_steps=3"])
    with pytest.raises(ConfigError, match="grad_accumulation_steps: must be >= 1"):
        load_config(None, [*base, "train.grad_accumulation_steps=0"])
    load_config(None, [*base, "train.batch_size=1024", "train.grad_accumulation_steps=4"])
