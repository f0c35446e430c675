"""Which SAEs this rank trains and where their batches come from: the activation source
(LLM or cached files; a rank reads its data-parallel share), each SAE's input/output keys, the
layout checks that need no model, the placement (replicated data parallel, or layer-distributed
SAEs fed by routed activations), and the shared initialisation sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from framework import hooks, text_data
from framework.activations import ActivationSource, FileSource, LLMSource
from framework.engine import Engine, mesh_shape
from framework.errors import ConfigError, DataError
from framework.kinds import SAE_KINDS, lm_gradient_sites, parse_options
from framework.llm import check_zero3_layout, load_frozen
from framework.routing import RoutedSource, assign_owners
from framework.registry import Registry
from framework.schema import RunConfig
from framework.store import build_store_source, configured_sites

log = logging.getLogger("sparsemill")


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


SOURCES: Registry = Registry("data.source")  # name -> (cfg, device, rank, world) -> ActivationSource


def build_source(cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1) -> ActivationSource:
    """This rank's activation source (`data.source`), reading its data-parallel share."""
    return SOURCES[cfg.data.source](cfg, device, rank, world)


@SOURCES.register("activations")
def _file_source(cfg: RunConfig, device, rank: int, world: int) -> ActivationSource:
    return FileSource(cfg.data, device, cfg.train.seed, eval_rows=cfg.eval.tokens, rank=rank, world=world)


@SOURCES.register("store")
def _store_source(cfg: RunConfig, device, rank: int, world: int) -> ActivationSource:
    return build_store_source(cfg, device, rank, world)


def check_sites_resolve(cfg: RunConfig, model) -> None:
    """Every SAE's sites exist in the loaded model, else a ConfigError naming the SAE's key (a
    kind that derives its sites from options, a CLT, names its options)."""
    for i, s in enumerate(cfg.saes):
        derived = SAE_KINDS[s.kind].configured_sites(parse_options(s.kind, s.options)) is not None
        for key in ("site", "output_site"):
            for spec in hooks.parse_sites(getattr(s, key)) if getattr(s, key) else ():
                try:
                    hooks.resolve(model, spec)
                except ConfigError as err:
                    where = f"saes.{i}.options" if derived else f"saes.{i}.{key}"
                    raise ConfigError(f"{where}: {err}") from None


@SOURCES.register("text")
def _llm_source(cfg: RunConfig, device, rank: int, world: int) -> ActivationSource:
    check_zero3_layout(cfg, world)
    model, tokenizer = load_frozen(cfg.model, seed=cfg.train.seed)
    check_sites_resolve(cfg, model)
    return LLMSource(cfg.data, model, tokenizer, configured_sites(cfg), device, cfg.train.seed, rank, world,
                     grad_sites=lm_gradient_sites(cfg.saes))


@SOURCES.register("images")
def _image_source(cfg: RunConfig, device, rank: int, world: int) -> ActivationSource:
    from framework.vision import build_image_source  # noqa: PLC0415  (a vision encoder)

    return build_image_source(cfg, configured_sites(cfg), device, rank, world)


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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Placement:
    """Which SAEs this rank trains, where their batches come from, and how many ranks share
    each SAE's global batch (data parallel: all of them; layer-distributed: one)."""

    saes: list  # SAEConfigs trained here
    source: object  # batches(split) with the sites these SAEs read
    share: int  # ranks that split one SAE's batch
    sae_engine: Engine | None  # engine for the SAEs' layout and reductions (None: each SAE whole, here)
    each_rank_writes: bool  # checkpoints/exports: every rank writes its own SAEs
    reduce_batch: object = _local  # sum over the ranks that split a batch (evaluation statistics)
    reduce_counts: object = _local  # sum of per-latent counts over the ranks holding latents


def place(cfg: RunConfig, engine: Engine, source: ActivationSource, sites: dict) -> Placement:
    if cfg.dist.sae_placement == "layer" and engine.world > 1:
        owners = assign_owners([s.name for s in cfg.saes], engine.world)
        sites_of_rank = [sorted({site for s in cfg.saes if owners[s.name] == r for site in sites[s.name]})
                         for r in range(engine.world)]
        mine = [s for s in cfg.saes if owners[s.name] == engine.rank]
        return Placement(mine, RoutedSource(source, sites_of_rank, engine.rank, engine.world), 1, None, True)
    return Placement(list(cfg.saes), source, engine.dp_world, engine, False, engine.data_reduce_, engine.all_reduce_)


def take_tokens(stream, n_tokens: int) -> list[dict]:
    """The stream's first batches, at least n_tokens rows."""
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


def init_saes(trainers: dict, init: list[dict], broadcast: bool) -> None:
    """Normalisation constants and b_dec from the first tokens of the stream (rank 0's on
    every rank when the ranks share the SAEs, so all replicas start from identical weights)."""
    for tr in trainers.values():
        x = torch.cat([b[tr.input_site] for b in init])
        y = torch.cat([b[tr.output_site] for b in init])
        if broadcast:
            x, y = _broadcast_sample(x), _broadcast_sample(y)
        tr.init_from_sample(x, y)
