"""Progress bar and TensorBoard scalars. Metrics are read from the device only every
`log.every_steps` steps (one sync), never per step just to log."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from framework.schema import LogConfig

log = logging.getLogger("sparsemill")


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LogConfig, total_tokens: int, is_main: bool = True, start_tokens: int = 0):
        """Only the main rank writes; the others still take part in the metric reductions."""
        self.cfg = cfg
        self.writer = None
        if cfg.tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = None
        if cfg.progress and is_main:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total_tokens, initial=start_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                            desc="train")
        self.start = time.perf_counter()
        self.start_tokens = start_tokens
        self.last_tokens, self.last_time = start_tokens, self.start
        self.hist_tokens = start_tokens

    def on_step(self, step: int, tokens: int, trainers: dict) -> None:
        if self.bar is not None:
            self.bar.update(tokens - self.bar.n)
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            now = time.perf_counter()
            tok_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_tokens, self.last_time = tokens, now
            postfix = {}
            for name, tr in trainers.items():
                scalars = tr.read_sums()
                for key, value in scalars.items():
                    self.scalar(f"train/{name}/{key}", value, step)
                postfix[name] = f"fvu={scalars['fvu']:.3f} L0={scalars['l0']:.0f} dead={scalars['dead_frac']:.2f}"
            self.scalar("train/tokens_per_s", tok_s, step)
            self.scalar("train/tokens", tokens, step)
            if self.bar is not None:
                self.bar.set_postfix_str(" | ".join(f"{k}: {v}" for k, v in postfix.items()) + f" | {tok_s:,.0f} tok/s")
        if self.cfg.histogram_every and step % self.cfg.histogram_every == 0:
            for name, tr in trainers.items():
                density = tr.density_log10(tokens - self.hist_tokens)
                if self.writer is not None:
                    self.writer.add_histogram(f"train/{name}/log10_density", density, step)
            self.hist_tokens = tokens

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def eval_results(self, metrics: dict[str, dict], stats: dict, step: int) -> None:
        for name, values in metrics.items():
            for key, value in values.items():
                self.scalar(f"eval/{name}/{key}", value, step)
            if self.writer is not None:
                self.writer.add_histogram(f"eval/{name}/log10_density", stats[name].log10_density(), step)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
