"""The train loop: config -> activation source -> mixing buffer -> SAE steps -> checkpoints,
evaluation, logs and SAELens exports in RUN_DIR."""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
import yaml

from framework import checkpoint, export, hooks
from framework.activations import ActivationSource, FileSource, LLMSource
from framework.buffer import MixingBuffer
from framework.config import ConfigError, RunConfig
from framework.evaluate import evaluate
from framework.llm import load_frozen, resolve_device
from framework.logs import RunLogger
from framework.sae_trainer import SAETrainer, total_steps_for

log = logging.getLogger("sparsemill")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sae_sites(cfg: RunConfig, source: ActivationSource) -> dict[str, tuple[str, str]]:
    """SAE name -> (input key, output key) in the source's batches."""
    out = {}
    for i, s in enumerate(cfg.saes):
        site = s.site
        if not site:
            if len(source.dims) != 1:
                raise ConfigError(f"saes.{i}.site: the activation files hold {sorted(source.dims)}; name one")
            site = next(iter(source.dims))
        for key, value in (("site", site), ("output_site", s.output_site or site)):
            if value not in source.dims:
                raise ConfigError(f"saes.{i}.{key}: '{value}' not among the source's sites {sorted(source.dims)}")
        out[s.name] = (site, s.output_site or site)
    return out


def build_source(cfg: RunConfig, device: torch.device) -> ActivationSource:
    if cfg.data.source == "activations":
        return FileSource(cfg.data, device, cfg.train.seed, eval_rows=cfg.eval.tokens)
    model, tokenizer = load_frozen(cfg.model, seed=cfg.train.seed)
    sites = sorted({s.site for s in cfg.saes} | {s.output_site for s in cfg.saes if s.output_site})
    return LLMSource(cfg.data, model, tokenizer, sites, device, cfg.train.seed)


def _take_tokens(stream, n_tokens: int) -> list[dict]:
    taken, count = [], 0
    for batch in stream:
        taken.append(batch)
        count += next(iter(batch.values())).shape[0]
        if count >= n_tokens:
            break
    return taken


def _tl_names(cfg: RunConfig) -> dict[str, str]:
    return {s.name: hooks.parse_site(s.site).tl_name if s.site else "" for s in cfg.saes}


def run_eval(cfg: RunConfig, source, trainers, logger: RunLogger, step: int) -> dict:
    result = evaluate(source, trainers, cfg.eval.tokens, cfg.eval.splice_tokens, cfg.eval.splice)
    logger.eval_results(result["metrics"], result["stats"], step)
    return result


def train(cfg: RunConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)

    source = build_source(cfg, device)
    sites = sae_sites(cfg, source)
    total_steps = total_steps_for(cfg.train)
    trainers = {
        s.name: SAETrainer(s, cfg.train, *sites[s.name], source.dims, total_steps, device, seed=cfg.train.seed + i)
        for i, s in enumerate(cfg.saes)
    }
    stream = source.batches("train")
    init = _take_tokens(stream, cfg.train.init_tokens)
    for s in cfg.saes:
        tr = trainers[s.name]
        x = torch.cat([b[tr.input_site] for b in init])
        y = torch.cat([b[tr.output_site] for b in init])
        tr.sae.init_from_sample(x, y, s.normalize_activations, s.b_dec_init)

    logger = RunLogger(run_dir, cfg.log, cfg.train.total_tokens)
    buffer = MixingBuffer(cfg.train.buffer_tokens, cfg.train.batch_size, cfg.train.seed, device)
    ckpt_root = run_dir / "checkpoints"
    step = tokens = 0
    for batch in buffer.batches(itertools.chain(init, stream)):
        for tr in trainers.values():
            tr.step(batch[tr.input_site], batch[tr.output_site])
        step += 1
        tokens += cfg.train.batch_size
        logger.on_step(step, tokens, trainers)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            checkpoint.save_checkpoint(ckpt_root, step, tokens, trainers, {}, cfg.train.keep_checkpoints)
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            run_eval(cfg, source, trainers, logger, step)
        if tokens >= cfg.train.total_tokens:
            break
    train_seconds = logger.elapsed()
    checkpoint.save_checkpoint(ckpt_root, step, tokens, trainers, {}, cfg.train.keep_checkpoints)

    result = run_eval(cfg, source, trainers, logger, step)
    metrics = result["metrics"]
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    tl_names = _tl_names(cfg)
    for s in cfg.saes:
        tr = trainers[s.name]
        with tr.evaluating():
            export.export_sae(tr.sae, run_dir / "export" / s.name, s.kind, {
                "model_name": cfg.model.name if cfg.data.source == "text" else "",
                "hook_name": tl_names[s.name],
                "hook_name_out": hooks.parse_site(s.output_site).tl_name if s.output_site else None,
                "context_size": cfg.data.context_size,
                "prepend_bos": cfg.data.prepend_bos,
                "dataset_path": ",".join(cfg.data.paths) or cfg.data.activations_dir,
                "training_tokens": tokens,
            }, result["stats"][s.name].log10_density())
    logger.close()
    summary = {
        "tokens": tokens,
        "steps": step,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round(tokens / max(train_seconds, 1e-9), 1),
        "nonfinite_tokens_skipped": source.nonfinite_tokens,
        "outlier_tokens_dropped": source.outlier_tokens,
        "saes": metrics,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"trained {summary['tokens']:,} tokens in {summary['train_seconds']:.1f} s "
             f"({summary['tokens_per_s']:,.0f} tokens/s, {summary['steps']} steps)"]
    for name, m in summary["saes"].items():
        extra = ""
        if "delta_ce" in m:
            extra = f"  dCE={m['delta_ce']:.4f}  KL={m['kl']:.4f}  CE-recovered={m['ce_recovered']:.3f}"
        lines.append(f"  {name}: FVU={m['fvu']:.4f}  L0={m['l0']:.1f}  dead={m['dead_frac']:.3f}  "
                     f"dense={m['dense_frac']:.3f}  cos={m['cos']:.3f}{extra}")
    return "\n".join(lines)
