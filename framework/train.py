"""The train loop: config -> activation source -> mixing buffer -> SAE steps -> checkpoints,
evaluation, logs and SAELens exports in RUN_DIR (data flows one way; see ARCHITECTURE.md)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from framework import export, placement, token_exchange, watchdog
from framework.activations import SKIP_REASONS
from framework.buffer import MixingBuffer
from framework.checkpoint import CheckpointManager
from framework.engine import Engine
from framework.evaluate import evaluate
from framework.lm_grads import grad_key
from framework.logs import RunLogger
from framework.preemption import Preempted, PreemptionFlag
from framework.rng import RNGState, seed_everything
from framework.run_lock import RunLock
from framework.sae_trainer import SAETrainer, total_steps_for
from framework.schema import RunConfig
from framework.stateful import Saved, State, StateDict
from framework.train_stream import TrainStream

log = logging.getLogger("sparsemill")


@dataclass
class Progress:
    """Where the run stands (step, tokens, the last periodic evaluation): `state.json` of a
    checkpoint, written by rank 0."""

    sae_names: list[str]
    world: int
    is_main: bool
    step: int = 0
    tokens: int = 0
    last_eval: dict | None = field(default=None)

    def state_dict(self) -> StateDict:
        meta = {"step": self.step, "tokens": self.tokens, "world_size": self.world,
                "saes": {name: self.step for name in self.sae_names}, "eval": self.last_eval}
        return StateDict(shared=State(meta=meta) if self.is_main else None)

    def load_state_dict(self, saved: Saved) -> None:
        meta = saved.shared.meta
        self.step, self.tokens, self.last_eval = meta["step"], meta["tokens"], meta.get("eval")


def train(cfg: RunConfig) -> dict:
    preemption = PreemptionFlag(cfg.dist.timeout_s)  # first: a signal during model loading is honoured at step 1
    try:
        with RunLock(cfg.run_dir):  # one training per run directory (framework/run_lock.py)
            return _train(cfg, preemption)
    finally:
        preemption.close()


def _train(cfg: RunConfig, preemption: PreemptionFlag) -> dict:
    engine = Engine(cfg.dist, cfg.train.device)
    placement.check_layout(cfg, engine.world)
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed)
    source = placement.build_source(cfg, engine.device, engine.dp_rank, engine.dp_world)  # a shard group: one stream
    placement.check_eval_split(cfg, source, engine)
    sites = placement.sae_sites(cfg, source)
    p = placement.place(cfg, engine, source, sites)
    total_steps = total_steps_for(cfg.train)
    trainers = {s.name: SAETrainer(s, cfg.train, *sites[s.name], p.source.dims, total_steps, engine.device,
                                   seed=cfg.train.seed + cfg.saes.index(s), engine=p.sae_engine) for s in p.saes}
    exchange = token_exchange.build(cfg.train.exchange_tokens, engine.dp_group, engine.dp_world)
    buffer = MixingBuffer(cfg.train.buffer_tokens // p.share, cfg.train.batch_size // p.share,
                          cfg.train.seed + engine.dp_rank, engine.device, exchange)
    progress = Progress([s.name for s in cfg.saes], engine.world, engine.is_main)
    logger = RunLogger(run_dir, cfg.log, cfg.train.total_tokens, engine.is_main)
    train_stream = TrainStream(source, p.source, cfg.data.prefetch_batches)  # stands in for the source's state
    components = {"state": progress, "source": train_stream, "buffer": buffer, "rng": RNGState(), "logger": logger,
                  **trainers}
    ckpt = CheckpointManager(run_dir / "checkpoints", cfg, engine, components, cfg.dist.sae_placement)
    resumed = ckpt.resume(cfg.train.resume)  # every component restores itself
    if engine.is_main:  # only now: a refused resume leaves the run directory as it was
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    stream = train_stream.batches()  # continues at the restored position
    if not resumed:  # fresh: normalisation and b_dec from the first tokens, which then train too
        init = placement.take_tokens(stream, max(1, cfg.train.init_tokens // p.share))
        placement.init_saes(trainers, init, broadcast=p.share > 1)
        buffer.push(init)

    logger.begin(progress.tokens)
    for batch in buffer.batches(stream) if progress.tokens < cfg.train.total_tokens else ():
        for tr in trainers.values():  # gsae: d(LM loss)/d(activation) of these rows, when the source gives it
            tr.step(batch[tr.input_site], batch[tr.output_site], batch.get(grad_key(tr.output_site)))
        progress.step += 1
        progress.tokens += cfg.train.batch_size
        logger.on_step(progress.step, progress.tokens, trainers)
        if ckpt.due(progress.step):
            ckpt.save(progress.step, progress.tokens)
        if cfg.eval.every_steps and progress.step % cfg.eval.every_steps == 0:
            with train_stream.paused():  # the model is evaluation's meanwhile
                periodic = run_eval(cfg, p, source, trainers, logger, progress.step)
            progress.last_eval = {"step": progress.step,
                                  "metrics": _gather_dicts(periodic["metrics"], engine, p.each_rank_writes),
                                  "replacement_sets": periodic["replacement_sets"]}
        if progress.tokens >= cfg.train.total_tokens:
            break
        if preemption.should_stop(engine):
            ckpt.save(progress.step, progress.tokens)
            train_stream.close()
            logger.close()
            engine.close()
            raise Preempted(f"stopped by signal {preemption.signal} at step {progress.step}; checkpoint saved in "
                            f"{ckpt.root}")
    train_seconds = logger.elapsed()
    train_stream.close()
    ckpt.save(progress.step, progress.tokens)

    result = run_eval(cfg, p, source, trainers, logger, progress.step)
    export_all(cfg, run_dir, trainers, result["stats"], progress.tokens)
    logger.close()
    tokens_per_s = (progress.tokens - logger.start_tokens) / max(train_seconds, 1e-9)
    summary = {
        "tokens": progress.tokens,
        "steps": progress.step,
        "world_size": engine.world,
        "strategy": cfg.dist.strategy,
        "sae_placement": cfg.dist.sae_placement,
        "latent_shards": engine.latent_shards,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        **_activation_rate(train_stream, engine, tokens_per_s),
        **_skip_counts(train_stream.skipped(), engine),
        "saes": _gather_dicts(result["metrics"], engine, p.each_rank_writes),
        "replacement_sets": result["replacement_sets"],  # sets need replicated SAEs: every rank has them
        "sae_training": _gather_dicts({name: tr.training_cost() for name, tr in trainers.items()}, engine,
                                      p.each_rank_writes),
    }
    summary["saes"] = {s.name: summary["saes"][s.name] for s in cfg.saes}
    summary["sae_training"] = {s.name: summary["sae_training"][s.name] for s in cfg.saes}
    if engine.is_main:  # eval.json: per SAE, then per replacement set (names never clash: framework/replacement.py)
        (run_dir / "eval.json").write_text(json.dumps(summary["saes"] | summary["replacement_sets"], indent=2))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    engine.close()
    return summary


def run_eval(cfg: RunConfig, p: placement.Placement, source, trainers, logger: RunLogger, step: int) -> dict:
    watchdog.pause(watchdog.EVAL_DELAY_ENV, f"the evaluation at step {step}")  # test hook
    result = evaluate(p.source, trainers, cfg.eval.tokens, cfg.eval.splice_tokens, cfg.eval.splice,
                      p.reduce_batch, p.share, source, p.reduce_counts, cfg.eval.replacement_sets)
    logger.eval_results(result["metrics"], result["stats"], step, result["replacement_sets"])
    return result


def export_all(cfg: RunConfig, run_dir: Path, trainers: dict, stats: dict, tokens: int) -> None:
    """Every rank enters (gathering ZeRO-3 parameters or latent shards is collective); the
    ranks that write an SAE's state export it."""
    for s in cfg.saes:
        tr = trainers.get(s.name)
        if tr is None:
            continue
        with tr.evaluating(whole=True) as sae:
            if tr.runner.writes:
                meta = export.export_metadata(cfg, s, tokens, (tr.input_site, tr.output_site))
                export.export_sae(sae, run_dir / "export" / s.name, s.kind, meta, stats[s.name].log10_density())


def _gather_dicts(d: dict, engine: Engine, needed: bool) -> dict:
    """Layer placement: every rank's SAEs' entries on every rank."""
    if not needed:
        return d
    parts = [None] * engine.world
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


def _activation_rate(train_stream: TrainStream, engine: Engine, tokens_per_s: float) -> dict:
    """How fast activations came (tokenise + LLM forward to the last hook + cleaning, in the
    loop's thread or the producer's), summed over the data-parallel ranks, and the training
    rate's share of it (1 = the SAE steps cost nothing beside the LLM)."""
    rate = engine.data_reduce_(torch.tensor([train_stream.produced_rows / max(train_stream.produce_seconds, 1e-9)],
                                            dtype=torch.float64, device=engine.device)).item()
    return {"activation_tokens_per_s": round(rate, 1), "train_vs_activation_rate": round(tokens_per_s / rate, 3)
            if rate > 0 else 0.0, "prefetch_batches": train_stream.depth}


def _skip_counts(skipped: dict[str, dict[str, int]], engine: Engine) -> dict:
    """Rows no SAE saw, per reason and split (train: the stream; eval: the last pass over the
    held-out rows), summed over the data-parallel ranks."""
    splits = sorted(skipped)
    counts = torch.tensor([skipped[sp][r] for sp in splits for r in SKIP_REASONS], device=engine.device)
    counts = engine.data_reduce_(counts).view(len(splits), len(SKIP_REASONS)).tolist()
    per_reason = {r: {sp: int(counts[i][j]) for i, sp in enumerate(splits)} for j, r in enumerate(SKIP_REASONS)}
    return {"nonfinite_tokens_skipped": per_reason["nonfinite"], "outlier_tokens_dropped": per_reason["outlier"],
            "lockstep_dropped_tokens": per_reason["lockstep"]}  # model.shard=zero3: rows cut to keep ranks aligned


def format_summary(summary: dict) -> str:
    lines = [f"trained {summary['tokens']:,} tokens in {summary['train_seconds']:.1f} s "
             f"({summary['tokens_per_s']:,.0f} tokens/s, {summary['steps']} steps)"]
    for name, m in summary["saes"].items():
        extra = ""
        if "delta_ce" in m:
            extra = f"  dCE={m['delta_ce']:.4f}  KL={m['kl']:.4f}  CE-recovered={m['ce_recovered']:.3f}"
        elif "embed_cos" in m:  # a vision encoder (framework/vision.py)
            extra = f"  embed-cos={m['embed_cos']:.4f}  embed-recovered={m['embed_recovered']:.3f}"
        lines.append(f"  {name}: FVU={m['fvu']:.4f}  L0={m['l0']:.1f}  dead={m['dead_frac']:.3f}  "
                     f"dense={m['dense_frac']:.3f}  cos={m['cos']:.3f}{extra}")
    for name, m in summary.get("replacement_sets", {}).items():
        if "delta_ce" in m:
            lines.append(f"  {name} (replacement set of {len(m['members'])}): dCE={m['delta_ce']:.4f}  KL={m['kl']:.4f}  "
                         f"CE-recovered={m['ce_recovered']:.3f}")
    return "\n".join(lines)
