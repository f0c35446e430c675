"""Worker for tests/test_state.py (run under torchrun): `train()` with extra overrides, recording
each SAE's live state on rank 0 at every checkpoint save (`saved_<step>.<sae>.safetensors`) and
straight after a resume (`resumed_<step>.<sae>.safetensors`): module weights, fp32 master weights
(ZeRO), Adam moments, step counts, lr, scheduler position and dead-latent counters. The state is
read through DeepSpeed's own safe_get_full_* API (ZeRO) or the torch optimizer (ddp), not through
the checkpoint code under test.

usage: zero_state_worker.py CONFIG DUMP_DIR [key=value ...]
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from framework import checkpoint
from framework.config import load_config
from framework.runners import ZeroRunner
from framework.sae_trainer import SAETrainer
from framework.train import train

MOMENTS = ("exp_avg", "exp_avg_sq")


def live_state(tr) -> dict[str, torch.Tensor]:
    """Collective under ZeRO (DeepSpeed gathers the partitions)."""
    runner = tr.runner
    params = list(runner.objective.named_parameters())
    with runner.gathered():
        out = {f"module.{n}": p.detach().clone() for n, p in params}
    if isinstance(runner, ZeroRunner):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: PLC0415

        inner = runner.optimizer.optimizer
        for n, p in params:
            out[f"master.{n}"] = safe_get_full_fp32_param(p).detach().clone()
            if inner.state:
                out |= {f"{key}.{n}": safe_get_full_optimizer_state(p, key).detach().clone() for key in MOMENTS}
    else:
        inner = runner.optimizer
        for n, p in params:
            if p in inner.state:
                out |= {f"{key}.{n}": inner.state[p][key].detach().clone() for key in MOMENTS}
    steps = sorted({float(s["step"]) for s in inner.state.values()})
    out["step"] = torch.tensor(steps, dtype=torch.float64)
    out["lr"] = torch.tensor([g["lr"] for g in runner.optimizer.param_groups], dtype=torch.float64)
    out["scheduler_epoch"] = torch.tensor([runner.scheduler.last_epoch])
    out["tokens_since_fired"] = tr.tokens_since_fired.clone()
    out["fire_counts"] = tr.fire_counts.clone()
    return {k: v.contiguous() for k, v in out.items()}


def main() -> None:
    cfg_path, dump, *overrides = sys.argv[1:]
    dump = Path(dump)
    dump.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.CheckpointManager

    def record(self, label: str) -> None:
        states = {n: live_state(tr) for n, tr in self.components.items() if isinstance(tr, SAETrainer)}
        if self.engine.is_main:
            for n, state in states.items():
                save_file(state, str(dump / f"{label}.{n}.safetensors"))

    def save(self, step, tokens, _save=manager.save):
        path = _save(self, step, tokens)
        record(self, f"saved_{step}")
        return path

    def resume(self, allowed=True, _resume=manager.resume):
        resumed = _resume(self, allowed)
        if resumed:
            record(self, f"resumed_{self.components['state'].step}")
        return resumed

    manager.save, manager.resume = save, resume
    summary = train(load_config(cfg_path, overrides))
    if os.environ.get("RANK", "0") == "0":
        (dump / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
