"""Validated run configurations: `load_config` = framework.schema's dataclasses (YAML + dotted
overrides) + every check that needs no model but the registries (SAE kinds, hook sites, model
names, strategies, optimizers), so that a typo or an impossible value fails in a second with a
message naming the key, not after a model loads. Nothing in the framework imports this
module (it imports them): the schema's types come from framework.schema."""

from __future__ import annotations

import re
from pathlib import Path

from framework import engine, hooks, kinds, llm, optim, replacement, tensor_parallel, text_data, vision
from framework.errors import ConfigError
from framework.schema import (  # noqa: F401  (re-exported: the config API in one place)
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    TrainConfig,
    build_dataclass,
    check,
    check_choice,
    did_you_mean,
    read_config,
)


STORE_DTYPES = ("float32", "bfloat16", "float16")  # what an activation store may hold (framework/store.py)

# component names of a checkpoint (framework/train.py) and its own files: no SAE may take them
RESERVED_NAMES = {"state", "source", "buffer", "rng", "logger", "manifest", "config"}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply `a.b.c=value` overrides (values parsed as YAML), build and validate."""
    cfg = read_config(path, overrides)
    validate(cfg)
    return cfg


def load_cache_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The same for `sparsemill cache` (validate_cache)."""
    cfg = read_config(path, overrides)
    validate_cache(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value: str, key: str) -> None:
    """auto | cpu | cuda | cuda:N, and CUDA only where there is one: never a silent CPU run."""
    check(bool(_DEVICE.match(value)), f"{key}: '{value}' is not a device; use auto, cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        import torch  # noqa: PLC0415

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(count > 0, f"{key}={value}: this machine has no usable CUDA device (torch {torch.__version__}, "
               f"cuda {'available' if torch.cuda.is_available() else 'not available'}); use {key}=auto or cpu")
        index = int(value.split(":")[1]) if ":" in value else 0
        check(index < count, f"{key}={value}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")


def validate_cache(cfg: RunConfig) -> None:
    """`sparsemill cache`: the run checks, plus an LLM to run and a store to write."""
    validate(cfg)
    c = cfg.cache
    check(cfg.data.source == "text", f"data.source: `sparsemill cache` runs the LLM over text (data.source=text), "
          f"got '{cfg.data.source}'")
    check(bool(cfg.data.store_dir), "data.store_dir: name the folder the activation store is written to")
    check(not Path(cfg.data.store_dir).exists() or Path(cfg.data.store_dir).is_dir(),
          f"data.store_dir: '{cfg.data.store_dir}' exists and is not a directory")
    check(not cfg.model.shard, "model.shard: `sparsemill cache` runs one whole model per process")
    check_choice(c.dtype, STORE_DTYPES, "cache.dtype")
    check(c.shard_rows > 0, "cache.shard_rows: must be > 0")
    check(c.tokens >= 0 and c.eval_tokens >= 0, "cache.tokens / cache.eval_tokens: must be >= 0 (0 = the train/eval "
          "token counts)")


def validate(cfg: RunConfig) -> None:
    """Checks that need no model. Site names, model names and kinds come from registries."""

    check(bool(cfg.run_dir), "run_dir: must be set")
    check(not Path(cfg.run_dir).exists() or Path(cfg.run_dir).is_dir(),
           f"run_dir: '{cfg.run_dir}' exists and is not a directory")
    _check_device(cfg.model.device, "model.device")
    _check_device(cfg.train.device, "train.device")
    check_choice(cfg.model.dtype, {"float32", "bfloat16", "float16"}, "model.dtype")
    check_choice(cfg.model.shard, {"", "zero3"}, "model.shard")
    check(not (cfg.model.shard and cfg.model.device_map),
           "model.shard / model.device_map: choose one way to split the LLM (ZeRO-3 across ranks, or a device map "
           "inside a node)")
    check(not cfg.model.shard or cfg.data.source == "text", "model.shard: data.source=activations runs no LLM")
    check_choice(cfg.train.autocast, {"none", "bfloat16"}, "train.autocast")
    check_choice(cfg.log.wandb.mode, {"online", "offline", "disabled"}, "log.wandb.mode")
    check_choice(cfg.data.source, {"text", "activations", "images", "store"}, "data.source")
    check_choice(cfg.data.separator, {"eos", "bos", "none"}, "data.separator")
    check_choice(cfg.train.optimizer, optim.OPTIMIZERS, "train.optimizer")
    check_choice(cfg.dist.strategy, engine.STRATEGIES, "dist.strategy")
    check_choice(cfg.dist.sae_placement, {"replicated", "layer"}, "dist.sae_placement")
    check(cfg.data.prefetch_batches >= 0, "data.prefetch_batches: must be >= 0 (0 = no producer thread)")
    check(not cfg.data.prefetch_batches or (cfg.dist.sae_placement == "replicated" and not cfg.model.shard),
          "data.prefetch_batches: the producer thread cannot run collectives beside the SAE steps' "
          f"(dist.sae_placement=layer routes batches between ranks, model.shard=zero3 gathers the LLM); "
          f"got sae_placement={cfg.dist.sae_placement}, model.shard={cfg.model.shard or 'none'}: use 0")
    check(cfg.dist.sae_placement != "layer" or not cfg.dist.strategy.startswith("zero"),
           "dist.strategy: ZeRO shards an SAE over the ranks that train it, but with dist.sae_placement=layer "
           "each SAE is trained whole by one rank; use dist.strategy: ddp there")
    check(not cfg.dist.strategy.startswith("zero") or cfg.train.optimizer in optim.ZERO_COMPATIBLE,
           f"dist.strategy: {cfg.dist.strategy} needs train.optimizer: {' or '.join(sorted(optim.ZERO_COMPATIBLE))} "
           "(DeepSpeed takes torch optimizers)")
    check(cfg.dist.timeout_s > 0, "dist.timeout_s: must be > 0 (seconds any rank waits for the others)")
    check(cfg.dist.latent_shards >= 1, "dist.latent_shards: must be >= 1 (1 = every rank holds whole SAEs)")
    check(cfg.dist.latent_shards == 1 or (cfg.dist.strategy == "ddp" and cfg.dist.sae_placement == "replicated"),
           f"dist.latent_shards={cfg.dist.latent_shards} shards each SAE over a group of ranks, which works with "
           f"dist.strategy: ddp and dist.sae_placement: replicated only (got {cfg.dist.strategy}/"
           f"{cfg.dist.sae_placement}): ZeRO would partition the shards again, layer placement gives SAEs whole "
           "to single ranks")
    if cfg.data.source == "text":
        llm.check_model_name(cfg.model.name)
        check(bool(cfg.data.paths), "data.paths: give at least one text file, folder, glob or hub dataset")
        text_data.resolve_sources(cfg.data.paths)
        check(cfg.data.context_size >= 2, "data.context_size: must be >= 2")
        check(cfg.data.llm_batch_size >= 1, "data.llm_batch_size: must be >= 1")
    elif cfg.data.source == "images":
        vision.validate(cfg)
        check(cfg.data.llm_batch_size >= 1, "data.llm_batch_size: must be >= 1 (images per forward)")
    elif cfg.data.source == "store":
        d = Path(cfg.data.store_dir)
        check(bool(cfg.data.store_dir) and d.is_dir(),
              f"data.store_dir: activation store folder not found: '{d}' (write one with `sparsemill cache`)")
    else:
        d = Path(cfg.data.activations_dir)
        check(bool(cfg.data.activations_dir) and d.is_dir(), f"data.activations_dir: folder not found: '{d}'")
    check(cfg.data.norm_outlier_factor >= 0, "data.norm_outlier_factor: must be >= 0")
    t = cfg.train
    check(t.total_tokens > 0, "train.total_tokens: must be > 0")
    check(t.batch_size > 0, "train.batch_size: must be > 0")
    check(t.total_tokens >= t.batch_size,
           f"train.total_tokens={t.total_tokens} is smaller than train.batch_size={t.batch_size}: not one full "
           "optimizer step; raise total_tokens or lower batch_size")
    check(t.grad_accumulation_steps >= 1, "train.grad_accumulation_steps: must be >= 1")
    check(t.batch_size % t.grad_accumulation_steps == 0,
           f"train.batch_size={t.batch_size} is not divisible by train.grad_accumulation_steps={t.grad_accumulation_steps}")
    check(t.buffer_tokens >= t.batch_size, "train.buffer_tokens: must be >= train.batch_size")
    check(not t.exchange_tokens or cfg.dist.sae_placement == "replicated",
          "train.exchange_tokens: with dist.sae_placement=layer each rank trains whole SAEs on its sites' rows routed "
          "from every rank (framework/routing.py), which already mix all ranks' documents; set it false")
    check(len(t.adam_betas) == 2, "train.adam_betas: needs two numbers")
    check(0 <= t.decay_fraction <= 1, "train.decay_fraction: must be in [0, 1]")
    check(t.warmup_steps >= 0, "train.warmup_steps: must be >= 0")
    check(t.grad_clip >= 0, "train.grad_clip: must be >= 0")
    check(t.init_tokens > 0, "train.init_tokens: must be > 0")
    check(t.checkpoint_every >= 0, "train.checkpoint_every: must be >= 0")
    check(t.checkpoint_minutes >= 0, "train.checkpoint_minutes: must be >= 0 (0 = off)")
    check(t.keep_checkpoints >= 1, "train.keep_checkpoints: must be >= 1")
    check(cfg.eval.tokens > 0, "eval.tokens: must be > 0")
    check(cfg.eval.splice_tokens >= 0, "eval.splice_tokens: must be >= 0")
    check(bool(cfg.saes), "saes: configure at least one SAE")
    names = set()
    for i, s in enumerate(cfg.saes):
        key = f"saes.{i}"
        if not s.name:
            s.name = (s.site + ("-" + s.output_site if s.output_site else "")).replace(".", "_").replace(":", "_") or f"sae{i}"
        check(s.name not in names, f"{key}.name: duplicate SAE name '{s.name}'")
        check(s.name not in RESERVED_NAMES and not s.name.startswith("rank_") and "/" not in s.name,
               f"{key}.name: '{s.name}' names a checkpoint file of the run itself (reserved: {sorted(RESERVED_NAMES)}, "
               "rank_*, no '/'); choose another name")
        names.add(s.name)
        check_choice(s.kind, kinds.SAE_KINDS, f"{key}.kind")
        options = kinds.parse_options(s.kind, s.options, f"{key}.options")
        _kind_sites(cfg, s, options, key)
        if kinds.SAE_KINDS[s.kind].needs_lm_grad:  # gsae: d(LM loss)/d(activation) per token
            check(cfg.data.source == "text", f"{key}.kind: {s.kind} needs LM-loss gradients, which cached activations "
                   "(data.source=activations) do not hold; use data.source=text")
            check(llm.model_type_hint(cfg.model.name) not in llm.ENCODER_TYPES,
                   f"{key}.kind: {s.kind} needs a causal LM's next-token loss; '{cfg.model.name}' is an encoder")
            check(cfg.dist.sae_placement != "layer", f"{key}.kind: {s.kind} with dist.sae_placement=layer: routed "
                   "batches carry only activations, not the LM-loss gradients; use dist.sae_placement=replicated")
        if cfg.data.source in ("text", "images"):
            check(bool(s.site), f"{key}.site: required (e.g. blocks.6.resid_post)")
            hooks.parse_sites(s.site, f"{key}.site")
            if s.output_site:
                hooks.parse_sites(s.output_site, f"{key}.output_site")
        elif cfg.data.source == "activations":
            check(not s.output_site, f"{key}.output_site: transcoders need an LLM source or an activation store")
        check(s.n_latents > 0, f"{key}.n_latents: must be > 0")
        if cfg.dist.latent_shards > 1:
            tensor_parallel.check_shardable(s.kind, s.n_latents, cfg.dist.latent_shards, key)
        check(0 < s.k <= s.n_latents, f"{key}.k: must be in [1, n_latents={s.n_latents}], got {s.k}")
        check(s.k_anneal_start == 0 or s.k <= s.k_anneal_start <= s.n_latents,
               f"{key}.k_anneal_start: must be 0 (off) or in [k={s.k}, n_latents]")
        check(0 <= s.k_anneal_fraction <= 1, f"{key}.k_anneal_fraction: must be in [0, 1]")
        check(s.aux_k >= 0 and s.aux_coef >= 0, f"{key}.aux_k / aux_coef: must be >= 0")
        check(s.dead_after_tokens > 0, f"{key}.dead_after_tokens: must be > 0")
        check(s.lr >= 0, f"{key}.lr: must be >= 0")
        check_choice(s.b_dec_init, {"geometric_median", "mean", "zeros"}, f"{key}.b_dec_init")
        check(not s.skip_connection or (s.output_site and s.output_site != s.site),
               f"{key}.skip_connection: a skip connection maps the input site to a different output site, so it "
               f"needs a transcoder ({key}.output_site set and different from {key}.site), not an SAE")
        check(not s.skip_connection or cfg.dist.latent_shards == 1,
               f"{key}.skip_connection: not supported with dist.latent_shards > 1 (the latent shards do not hold W_skip)")
    replacement.validate_sets(cfg)


def _kind_sites(cfg: RunConfig, s: SAEConfig, options, key: str) -> None:
    """Kinds that derive their sites from their options (a CLT: its layers) fill them in; a
    differing site in the config, or a configuration they cannot train, fails here."""
    sites = kinds.SAE_KINDS[s.kind].configured_sites(options)
    if sites is None:
        return
    for field, want in zip(("site", "output_site"), sites):
        given = getattr(s, field)
        check(not given or given == want, f"{key}.{field}: kind {s.kind} reads and writes the sites of "
               f"{key}.options.layers ({sites[0]} -> {sites[1]}); leave {field} empty (got '{given}')")
        setattr(s, field, want)
    check(cfg.data.source == "text", f"{key}.kind: {s.kind} needs an LLM (data.source=text): its stacked sites are "
           "captured from one forward")
    check(not s.skip_connection, f"{key}.skip_connection: not supported for kind {s.kind} (its decoders already "
           "reach every later layer); use kind topk/jumprelu transcoders for skip transcoders")
