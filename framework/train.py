"""The train loop: config -> activation source -> mixing buffer -> SAE steps -> checkpoints,
evaluation, logs and SAELens exports in RUN_DIR."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from framework import checkpoint, export, text_data, watchdog
from framework.activations import SKIP_REASONS, ActivationSource, FileSource, LLMSource
from framework.buffer import MixingBuffer
from framework.schema import ConfigError, RunConfig
from framework.engine import Engine, mesh_shape
from framework.errors import DataError
from framework.evaluate import evaluate
from framework.llm import check_zero3_layout, load_frozen
from framework.logs import RunLogger
from framework.preemption import Preempted, PreemptionFlag
from framework.routing import RoutedSource, assign_owners
from framework.run_lock import RunLock
from framework.sae_trainer import SAETrainer, total_steps_for
from framework.kinds import lm_gradient_sites
from framework.lm_grads import grad_key

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


def build_source(cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1) -> ActivationSource:
    if cfg.data.source == "activations":
        return FileSource(cfg.data, device, cfg.train.seed, eval_rows=cfg.eval.tokens, rank=rank, world=world)
    check_zero3_layout(cfg, world)
    model, tokenizer = load_frozen(cfg.model, seed=cfg.train.seed)
    sites = sorted({s.site for s in cfg.saes} | {s.output_site for s in cfg.saes if s.output_site})
    return LLMSource(cfg.data, model, tokenizer, sites, device, cfg.train.seed, rank, world,
                     grad_sites=lm_gradient_sites(cfg.saes))


def check_eval_split(cfg: RunConfig, source: ActivationSource, engine: Engine) -> None:
    """An evaluation on zero tokens would report a perfect score: refuse it before training;
    a held-out split smaller than eval.tokens is said with both numbers."""
    want = cfg.eval.tokens
    have = int(engine.data_reduce_(torch.tensor([source.eval_tokens_available(max(1, want // engine.dp_world))],
                                                 device=engine.device)).item())
    if have == 0:
        where = (f"the last eval.tokens rows of {cfg.data.activations_dir}" if cfg.data.source == "activations" else
                 f"the {text_data.EVAL_PERCENT}% of documents of data.paths chosen by content hash")
        raise DataError(f"the held-out split is empty ({where} hold no usable tokens): evaluation would score "
                        "nothing; add data (more or longer documents)")
    if have < want:
        log.warning("eval.tokens=%d, but the held-out split has only %d usable tokens: evaluating on %d", want, have,
                    have)


def check_layout(cfg: RunConfig, world: int) -> None:
    """Impossible distributed layouts fail before any model loads."""
    t = cfg.train
    if cfg.dist.sae_placement == "layer":
        assign_owners([s.name for s in cfg.saes], world)
        return
    dp, shards = mesh_shape(world, cfg.dist.latent_shards)
    ranks = "world size" if shards == 1 else f"data-parallel size (world size {world} / dist.latent_shards={shards})"
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {ranks} {dp}")
    if (t.batch_size // dp) % t.grad_accumulation_steps:
        raise ConfigError(f"train.batch_size={t.batch_size}: the per-rank batch {t.batch_size // dp} is not divisible "
                          f"by train.grad_accumulation_steps={t.grad_accumulation_steps}")
    if t.buffer_tokens < t.batch_size // dp:
        raise ConfigError(f"train.buffer_tokens: must be >= the per-rank batch (train.batch_size / {ranks})")


@dataclass
class Placement:
    """Which SAEs this rank trains, where their batches come from, and how many ranks share
    each SAE's global batch (data parallel: all of them; layer-distributed: one)."""

    saes: list  # SAEConfigs trained here
    source: object  # batches(split) with the sites these SAEs read
    share: int  # ranks that split one SAE's batch
    sae_engine: Engine | None  # engine for the SAEs' wrapping and reductions (None: local)
    each_rank_writes: bool  # checkpoints/exports: every rank writes its own SAEs


def place(cfg: RunConfig, engine: Engine, source: ActivationSource, sites: dict) -> Placement:
    if cfg.dist.sae_placement == "layer" and engine.world > 1:
        owners = assign_owners([s.name for s in cfg.saes], engine.world)
        sites_of_rank = [sorted({site for s in cfg.saes if owners[s.name] == r for site in sites[s.name]})
                         for r in range(engine.world)]
        mine = [s for s in cfg.saes if owners[s.name] == engine.rank]
        return Placement(mine, RoutedSource(source, sites_of_rank, engine.rank, engine.world), 1, None, True)
    return Placement(list(cfg.saes), source, engine.dp_world, engine, False)


def _take_tokens(stream, n_tokens: int) -> list[dict]:
    taken, count = [], 0
    for batch in stream:
        taken.append(batch)
        count += next(iter(batch.values())).shape[0]
        if count >= n_tokens:
            break
    return taken


def _broadcast_sample(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's init sample on every rank, so all replicas start from identical weights."""
    n = torch.tensor([x.shape[0]], device=x.device)
    dist.broadcast(n, 0)
    x = x[: int(n)] if x.shape[0] >= int(n) else torch.cat([x, x.new_zeros(int(n) - x.shape[0], x.shape[1])])
    x = x.contiguous()
    dist.broadcast(x, 0)
    return x


def init_saes(trainers: dict, sae_cfgs: list, init: list[dict], broadcast: bool) -> None:
    """Normalisation constants and b_dec from the first tokens of the stream."""
    for s in sae_cfgs:
        tr = trainers[s.name]
        x = torch.cat([b[tr.input_site] for b in init])
        y = torch.cat([b[tr.output_site] for b in init])
        if broadcast:
            x, y = _broadcast_sample(x), _broadcast_sample(y)
        tr.sae.init_from_sample(x, y, s.normalize_activations, s.b_dec_init)


def run_eval(cfg: RunConfig, p: Placement, llm_source, trainers, logger: RunLogger, step: int) -> dict:
    reduce = p.sae_engine.data_reduce_ if p.sae_engine is not None else (lambda t: t)
    latent_reduce = p.sae_engine.all_reduce_ if p.sae_engine is not None else None  # sums the shards' counts
    with checkpoint.training_weights_kept(trainers.values()):
        watchdog.pause(watchdog.EVAL_DELAY_ENV, f"the evaluation at step {step}")  # test hook
        result = evaluate(p.source, trainers, cfg.eval.tokens, cfg.eval.splice_tokens, cfg.eval.splice,
                          reduce, p.share, llm_source, latent_reduce)
    logger.eval_results(result["metrics"], result["stats"], step)
    return result


def export_all(cfg: RunConfig, run_dir: Path, trainers: dict, stats: dict, tokens: int, write: bool) -> None:
    """Every rank enters (gathering ZeRO-3 parameters is collective); those that `write` export."""
    for s in cfg.saes:
        if s.name not in trainers:
            continue
        with checkpoint.training_weights_kept([trainers[s.name]]), trainers[s.name].evaluating(whole=True) as sae:
            if write:
                tr = trainers[s.name]
                meta = checkpoint.export_metadata(cfg, s, tokens, (tr.input_site, tr.output_site))
                export.export_sae(sae, run_dir / "export" / s.name, s.kind, meta,
                                  stats[s.name].log10_density())


def _gather_dicts(d: dict, engine: Engine, needed: bool) -> dict:
    if not needed:
        return d
    parts = [None] * engine.world
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


def train(cfg: RunConfig) -> dict:
    preemption = PreemptionFlag(cfg.dist.timeout_s)  # first: a signal during model loading is honoured at step 1
    try:
        with RunLock(cfg.run_dir):  # one training per run directory (framework/run_lock.py)
            return _train(cfg, preemption)
    finally:
        preemption.close()


def _train(cfg: RunConfig, preemption: PreemptionFlag) -> dict:
    engine = Engine(cfg.dist, cfg.train.device)
    check_layout(cfg, engine.world)
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed)
    device = engine.device

    llm_source = build_source(cfg, device, engine.dp_rank, engine.dp_world)  # a latent-shard group reads one stream
    check_eval_split(cfg, llm_source, engine)
    sites = sae_sites(cfg, llm_source)
    p = place(cfg, engine, llm_source, sites)
    total_steps = total_steps_for(cfg.train)
    trainers = {s.name: SAETrainer(s, cfg.train, *sites[s.name], p.source.dims, total_steps, device,
                                   seed=cfg.train.seed + cfg.saes.index(s), engine=p.sae_engine) for s in p.saes}
    buffer = MixingBuffer(cfg.train.buffer_tokens // p.share, cfg.train.batch_size // p.share,
                          cfg.train.seed + engine.dp_rank, device)
    ckpt = checkpoint.CheckpointManager(run_dir / "checkpoints", cfg, engine, trainers, buffer, llm_source,
                                        p.each_rank_writes)
    resumed = ckpt.resume(cfg.train.resume)  # restores weights, optimizer, counters, data position, buffer, RNG
    if engine.is_main:  # only now: a refused resume leaves the run directory as it was
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    stream = p.source.batches("train")  # continues at the restored position
    if resumed is None:  # fresh: normalisation and b_dec from the first tokens, which then train too
        init = _take_tokens(stream, max(1, cfg.train.init_tokens // p.share))
        init_saes(trainers, p.saes, init, broadcast=p.share > 1)
        buffer.push(init)
    step, tokens = (resumed["step"], resumed["tokens"]) if resumed else (0, 0)

    logger = RunLogger(run_dir, cfg.log, cfg.train.total_tokens, engine.is_main, start_tokens=tokens)
    logger.hist_tokens = resumed.get("hist_tokens", tokens) if resumed else 0
    last_eval = resumed.get("eval") if resumed else None
    save = lambda: ckpt.save(step, tokens, {"hist_tokens": logger.hist_tokens, "eval": last_eval})  # noqa: E731
    for batch in buffer.batches(stream) if tokens < cfg.train.total_tokens else ():
        for tr in trainers.values():
            if tr.sae.needs_lm_grad:  # gsae: d(LM loss)/d(activation) of these rows
                tr.sae.set_grad(batch.get(grad_key(tr.output_site)))
            tr.step(batch[tr.input_site], batch[tr.output_site])
        step += 1
        tokens += cfg.train.batch_size
        logger.on_step(step, tokens, trainers)
        if ckpt.due(step):
            save()
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            metrics = run_eval(cfg, p, llm_source, trainers, logger, step)["metrics"]
            last_eval = {"step": step, "metrics": _gather_dicts(metrics, engine, p.each_rank_writes)}
        if tokens >= cfg.train.total_tokens:
            break
        if preemption.should_stop(engine):
            save()
            logger.close()
            engine.close()
            raise Preempted(f"stopped by signal {preemption.signal} at step {step}; checkpoint saved in {ckpt.root}")
    train_seconds = logger.elapsed()
    save()

    result = run_eval(cfg, p, llm_source, trainers, logger, step)
    export_all(cfg, run_dir, trainers, result["stats"], tokens, write=engine.is_main or p.each_rank_writes)
    logger.close()
    metrics = _gather_dicts(result["metrics"], engine, p.each_rank_writes)
    splits = sorted(llm_source.skipped)
    counts = torch.tensor([llm_source.skipped[sp][r] for sp in splits for r in SKIP_REASONS], device=device)
    counts = engine.data_reduce_(counts).view(len(splits), len(SKIP_REASONS)).tolist()
    skipped = {r: {sp: int(counts[i][j]) for i, sp in enumerate(splits)} for j, r in enumerate(SKIP_REASONS)}
    summary = {
        "tokens": tokens,
        "steps": step,
        "world_size": engine.world,
        "strategy": cfg.dist.strategy,
        "sae_placement": cfg.dist.sae_placement,
        "latent_shards": engine.latent_shards,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round((tokens - logger.start_tokens) / max(train_seconds, 1e-9), 1),
        # rows no SAE saw, per split (train: the stream; eval: the last pass over the held-out rows)
        "nonfinite_tokens_skipped": skipped["nonfinite"],
        "outlier_tokens_dropped": skipped["outlier"],
        "lockstep_dropped_tokens": skipped["lockstep"],  # model.shard=zero3: rows cut to keep ranks aligned
        "saes": {s.name: metrics[s.name] for s in cfg.saes},
    }
    if engine.is_main:
        (run_dir / "eval.json").write_text(json.dumps(summary["saes"], indent=2))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    engine.close()
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
