"""Progress bar, and scalars and density histograms to every enabled sink: TensorBoard, and
Weights & Biases (`log.wandb.project`; `mode: offline` needs no network). Metrics are read from
the device only every `log.every_steps` steps (one sync), never per step just to log. A sink's
library is imported only when it is enabled."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from framework.registry import Registry
from framework.schema import LogConfig
from framework.stateful import Saved, State, StateDict

log = logging.getLogger("sparsemill")

WANDB_ID_FILE = "wandb_run_id"  # in the run directory: a resumed run continues the same wandb run


class TensorBoardSink:
    def __init__(self, run_dir: Path, cfg: LogConfig, state: dict):
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        self.writer.add_histogram(tag, values, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One wandb run per run directory: its id is kept in the logger's checkpointed state and in
    run_dir/wandb_run_id (a run stopped before its first checkpoint continues it too)."""

    def __init__(self, run_dir: Path, cfg: LogConfig, state: dict):
        import wandb  # noqa: PLC0415

        id_file = run_dir / WANDB_ID_FILE
        run_id = state.get("wandb_run_id") or (id_file.read_text().strip() if id_file.is_file() else "")
        run_id = run_id or secrets.token_hex(4)  # wandb ids: [a-z0-9]
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        state["wandb_run_id"] = run_id
        w = cfg.wandb
        self.wandb = wandb
        self.run = wandb.init(project=w.project, entity=w.entity or None, mode=w.mode, id=run_id, resume="allow",
                              dir=str(run_dir), name=run_dir.name)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def histogram(self, tag: str, values, step: int) -> None:
        self.run.log({tag: self.wandb.Histogram(values.detach().cpu().numpy())}, step=step)

    def close(self) -> None:
        self.run.finish()


# name -> (enabled by the config?, sink class)
SINKS: Registry = Registry("log sink")
SINKS.register("tensorboard")((lambda cfg: cfg.tensorboard, TensorBoardSink))
SINKS.register("wandb")((lambda cfg: bool(cfg.wandb.project), WandbSink))


class RunLogger:
    """Writes only on the main rank (the others still take part in the metric reductions).
    Nothing is created before `begin`, so a run refused at resume writes no log."""

    def __init__(self, run_dir: Path, cfg: LogConfig, total_tokens: int, is_main: bool = True):
        self.run_dir, self.cfg, self.total_tokens, self.is_main = Path(run_dir), cfg, total_tokens, is_main
        self.sinks: list = []
        self.bar = None
        self.hist_tokens = 0  # tokens at the last density histogram (a checkpointed position)
        self.sink_state: dict = {}  # e.g. the wandb run id (checkpointed)
        self.start = self.last_time = time.perf_counter()
        self.start_tokens = self.last_tokens = 0

    def begin(self, tokens: int) -> None:
        """Start logging at `tokens` (a resumed run: where it stopped): the clock, and on the
        main rank the enabled sinks and the progress bar."""
        self.start = self.last_time = time.perf_counter()
        self.start_tokens = self.last_tokens = tokens
        if self.is_main and not self.sinks:
            self.sinks = [cls(self.run_dir, self.cfg, self.sink_state) for name in SINKS
                          for enabled, cls in [SINKS[name]] if enabled(self.cfg)]
        if self.cfg.progress and self.is_main and self.bar is None:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=self.total_tokens, initial=self.start_tokens, unit="tok", unit_scale=True,
                            dynamic_ncols=True, desc="train")

    def state_dict(self) -> StateDict:
        return StateDict(shared=State(meta={"hist_tokens": self.hist_tokens, **self.sink_state})
                         if self.is_main else None)

    def load_state_dict(self, saved: Saved) -> None:
        meta = dict(saved.shared.meta) if saved.shared is not None else {}
        self.hist_tokens = meta.pop("hist_tokens", 0)
        self.sink_state = meta

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
                self.histogram(f"train/{name}/log10_density", density, step)
            self.hist_tokens = tokens

    def scalar(self, tag: str, value: float, step: int) -> None:
        for sink in self.sinks:
            sink.scalar(tag, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        for sink in self.sinks:
            sink.histogram(tag, values, step)

    def eval_results(self, metrics: dict[str, dict], stats: dict, step: int, sets: dict[str, dict] | None = None) -> None:
        """Every SAE's metrics and density histogram, and each replacement set's metrics."""
        for name, values in metrics.items():
            for key, value in values.items():
                self.scalar(f"eval/{name}/{key}", value, step)
            if self.sinks:
                self.histogram(f"eval/{name}/log10_density", stats[name].log10_density(), step)
        for name, values in (sets or {}).items():
            for key, value in values.items():
                if key != "members":
                    self.scalar(f"eval/{name}/{key}", value, step)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
