"""Progress bar and TensorBoard scalars. Metrics are read from the device only every
`log.every_steps` steps (one sync), never per step just to log."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from framework.schema import LogConfig
from framework.stateful import Saved, State, StateDict

log = logging.getLogger("sparsemill")


class RunLogger:
    """Writes only on the main rank (the others still take part in the metric reductions).
    Nothing is created before `begin`, so a run refused at resume writes no log."""

    def __init__(self, run_dir: Path, cfg: LogConfig, total_tokens: int, is_main: bool = True):
        self.run_dir, self.cfg, self.total_tokens, self.is_main = run_dir, cfg, total_tokens, is_main
        self.writer = self.bar = None
        self.hist_tokens = 0  # tokens at the last density histogram (a checkpointed position)
        self.start = self.last_time = time.perf_counter()
        self.start_tokens = self.last_tokens = 0

    def begin(self, tokens: int) -> None:
        """Start logging at `tokens` (a resumed run: where it stopped): the clock, and on the
        main rank the TensorBoard writer and the progress bar."""
        self.start = self.last_time = time.perf_counter()
        self.start_tokens = self.last_tokens = tokens
        if self.cfg.tensorboard and self.is_main and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.cfg.progress and self.is_main and self.bar is None:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=self.total_tokens, initial=self.start_tokens, unit="tok", unit_scale=True,
                            dynamic_ncols=True, desc="train")

    def state_dict(self) -> StateDict:
        return StateDict(shared=State(meta={"hist_tokens": self.hist_tokens}) if self.is_main else None)

    def load_state_dict(self, saved: Saved) -> None:
        self.hist_tokens = saved.shared.meta["hist_tokens"] if saved.shared is not None else 0

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
