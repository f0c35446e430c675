"""Tensor parallelism over latents: a TopK SAE whose dictionary is split across devices.

Each rank of a tensor-parallel ("tp") process group holds rows [start, end) of encoder_weight,
encoder_bias and decoder_weight (`shard_range`); b_dec, input_scale and output_scale are
replicated. Every rank of the group sees the same batch x and ends with the same x_hat.

Forward (per step, per rank r of W):
  1. fused local top-k on the shard: `kernels.topk_encode` -> k_loc = min(k, n/W) candidates per
     token (relu'd values, or signed values for AbsTopK); never B x n.
  2. all_gather of the candidate VALUES only ([B, k_loc] per rank) -> each rank finds the global
     k-th best score per token and keeps its local candidates that are in the global top k.
     Tie rule (deterministic, the same on every rank): candidates are ordered by score
     (relu value, or |value| for AbsTopK) descending, then by global latent index ascending.
     Which of several exactly-tied latents a shard offers as a candidate is its kernel's choice,
     as on one device. Exact ties only happen in practice at score 0 (relu'd latents), which
     carry neither output nor gradient.
  3. partial x_hat = kernels.sparse_decode(kept values, local indices, decoder shard); one
     all_reduce(sum) of the partials; + b_dec.

Backward (autograd Functions with explicit collectives, Megatron's "f"/"g" pair):
  * `_ReduceFromShards` (the x_hat all-reduce): backward is the identity - the loss is computed
    identically on every rank from the replicated x_hat, so each partial gets the full grad.
  * `_CopyToShards` (x and b_dec entering the local encoder): forward identity, backward
    all_reduce(sum) of their gradients - each shard's encoder only sees its own latents.
    Only tensors that require grad go through it, packed into ONE buffer: in training x does
    not require grad, so the backward collective is d floats (b_dec's encoder-path gradient).
  * local shard parameters get their gradients locally; b_dec's decode-bias gradient is
    computed identically on every rank (replicated), so all b_dec.grad agree bit for bit.
  Loss terms may be replicated functions of x_hat, or per-shard sums over the local codes
  (e.g. an L1 term on `out.values`): the total loss is then replicated + sum over shards, and
  the gradients above are exactly those of that total.

Communication volume per step (fp32, B=4096 tokens, k=32, d=4096, n=2^20, W=8 shards):
  candidate gather  : W*B*k*4 B  = 8*4096*32*4     =   4 MiB received per rank (512 KiB sent)
  x_hat all-reduce  : B*d*4 B    = 4096*4096*4     =  64 MiB buffer; a ring moves
                      2*(W-1)/W * 64 MiB = 112 MiB per rank (sent, and as much received)
  b_dec grad reduce : d*4 B      = 16 KiB (+ 64 MiB if x itself needs a gradient)
  total             : ~ 68 MiB of payload, ~ 116 MiB on the wire per rank per step
  alternative (gather the full pre-activations to select the top k exactly):
                      B*n*4 B    = 4096*2^20*4     =  16 GiB per rank per step (14 GiB of it
                      from other ranks) - 4096x the candidate gather (n / (W*k)) and ~140x
                      the whole scheme above; it also needs 16 GiB of memory per rank.
  The x_hat all-reduce dominates (it is B*d whatever n is); the selection costs W*B*k.
  (`CommCounter` records what this module actually sends; tests/test_tensor_parallel.py checks
  the per-step list: one all_gather of B*k_loc values, one all_reduce of B*d, one of d.)

Data parallel x tensor parallel: `init_mesh(dp, tp)` builds a ("dp", "tp") device mesh; each
dp replica holds a full sharded model, every tp group reads the same batch, and
`sync_data_parallel_grads(dp_group)` averages all gradients over dp (one packed all_reduce).

In training (`dist.latent_shards`, see framework/engine.py for the per-step volume in B, d, n,
k and the ranks): the trainer cuts each shard from the same full initialisation as an
unsharded run (`from_full`), AuxK selects among dead latents with `encode_rows`, and
checkpoints and exports hold the whole model in TopKSAE's layout (`gather_state` /
`shard_state`, `gather_optimizer_state` / `shard_optimizer_state`), as an unsharded run's.
Those conversions are generic over `LatentShard` modules (each names its row-sharded tensors);
`SHARD_LAYOUTS` maps a kind to its shard: TopK/AbsTopK here, the TopK cross-layer transcoder in
framework/clt_sharding.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import kernels
from framework.errors import ConfigError
from framework.registry import Registry
from framework.sae import SAE_KINDS, SAEBase, SAEOutput, TopKSAE

__all__ = [
    "shard_range", "check_shardable", "LatentShard", "LatentShardedTopK", "ShardedSAEOutput", "from_full", "gather_full",
    "SHARD_LAYOUTS", "shard_group", "copy_inputs_to_shards",
    "gather_state", "shard_state", "gather_optimizer_state", "shard_optimizer_state", "init_mesh", "CommCounter",
]

# kind -> (whole module, group, backend) -> this rank's shard: kinds whose selection is a plain
# top k per token (or per layer and token: clt, framework/clt_sharding.py), which the shards
# agree on from gathered candidate values
SHARD_LAYOUTS: Registry = Registry("latent-shardable kind")


# -- sharding arithmetic -----------------------------------------------------------------
def shard_range(n_latents: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the latents held by `rank` of `world` latent shards (equal slices)."""
    if world < 1:
        raise ValueError(f"the number of latent shards must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world}) latent shards")
    if n_latents % world:
        lo = n_latents - n_latents % world
        hint = f"e.g. {lo} or {lo + world}" if lo else f"e.g. {world}"
        raise ValueError(f"n_latents={n_latents} is not divisible by the {world} latent shards "
                         f"(tensor-parallel size); use a multiple of {world} ({hint})")
    per = n_latents // world
    return rank * per, (rank + 1) * per


def check_shardable(kind: str, n_latents: int, shards: int, key: str = "sae") -> None:
    """ConfigError (naming `key`) unless an SAE of this kind and width splits into `shards`."""
    if kind not in SHARD_LAYOUTS:
        raise ConfigError(f"{key}.kind: '{kind}' cannot be latent-sharded (dist.latent_shards={shards}): only "
                          f"{sorted(SHARD_LAYOUTS)} select a plain top k per token (clt: per layer and token), which "
                          "the shards agree on from gathered candidate values; use dist.latent_shards: 1 for this kind")
    try:
        shard_range(n_latents, 0, shards)
    except ValueError as err:
        raise ConfigError(f"{key}.n_latents: {err}") from None


# -- collectives (all go through here so that CommCounter sees them) ----------------------
class CommCounter:
    """Records (op, bytes of the local buffer) of every collective this module issues while
    active: `with CommCounter() as c: ...; c.ops`."""

    active: "CommCounter | None" = None

    def __init__(self):
        self.ops: list[tuple[str, int]] = []

    def __enter__(self):
        self._prev, CommCounter.active = CommCounter.active, self
        return self

    def __exit__(self, *exc):
        CommCounter.active = self._prev

    @staticmethod
    def record(op: str, t: torch.Tensor) -> None:
        if CommCounter.active is not None:
            CommCounter.active.ops.append((op, t.numel() * t.element_size()))


# torch >= 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def _group_size(group) -> int:
    """Size of the group; 1 without an initialised process group (single-device use)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if _group_size(group) == 1:
        return t
    CommCounter.record("all_reduce", t)
    dist.all_reduce(t, group=group)
    return t


def _all_gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """[world, *t.shape], in group-rank order."""
    t = t.contiguous()
    if world == 1:
        return t.unsqueeze(0)
    CommCounter.record("all_gather", t)
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))  # gloo wants the dim-0 concatenation
    _all_gather_single(out, t, group=group)
    return out.view(world, *t.shape)


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradients over the group (one packed all_reduce):
    each shard's encoder contributes only its own latents' part of d loss / d input."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        _all_reduce(flat, ctx.group)
        out, pos = [], 0
        for g in grads:
            out.append(flat[pos : pos + g.numel()].view_as(g))
            pos += g.numel()
        return (None, *out)


class _ReduceFromShards(torch.autograd.Function):
    """all_reduce(sum) forward; identity backward (d sum / d partial = 1 on every rank, and the
    upstream gradient is already the same on every rank)."""

    @staticmethod
    def forward(ctx, partial, group):
        return _all_reduce(partial.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# -- global top-k from the gathered candidate values ---------------------------------------
@torch.no_grad()
def _global_keep(scores: torch.Tensor, local_idx: torch.Tensor, k: int, group, rank: int, world: int):
    """Mask [B, k_loc] of this rank's candidates that belong to the global top k.

    scores: this rank's candidate scores (>= 0); local_idx: their shard-local latent ids.
    Ordering: score descending, then global latent index ascending. Ranks hold increasing
    index ranges, so ties at the k-th score are given first to lower ranks, and within a rank
    to lower local ids: every rank decides its own entries from the gathered scores alone.
    """
    B, k_loc = scores.shape
    gathered = _all_gather(scores, group, world)  # [W, B, k_loc]
    if world * k_loc <= k:  # every candidate of every shard is in (k >= n, or masks)
        return torch.ones_like(scores, dtype=torch.bool)
    cand = gathered.permute(1, 0, 2).reshape(B, world * k_loc)
    kth = cand.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values  # [B, 1]
    slots = k - (cand > kth).sum(1, keepdim=True)  # places left for entries tied at kth (>= 1)
    ties_before = (gathered[:rank] == kth.unsqueeze(0)).sum(dim=(0, 2)).unsqueeze(1)  # lower ranks
    above, tied = scores > kth, scores == kth
    # rank of each tied entry among this row's tied entries, by local latent id
    order = local_idx.argsort(dim=1)
    tied_sorted = tied.gather(1, order).long()
    before_sorted = tied_sorted.cumsum(1) - tied_sorted
    tie_rank = torch.empty_like(before_sorted).scatter_(1, order, before_sorted)
    return above | (tied & (ties_before + tie_rank < slots))


# -- what every latent shard does with its group ---------------------------------------------
def shard_group(group) -> tuple[int, int]:
    """(rank, world) of this process in a latent-shard group; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def copy_inputs_to_shards(group, x: torch.Tensor, offset: torch.Tensor):
    """(x, encoder offset), through _CopyToShards when they need gradients: each shard's
    encoder sees only its latents, so their gradients are summed over the group."""
    if torch.is_grad_enabled():
        needs = [t for t in (x, offset) if t.requires_grad]
        if needs:
            copied = _CopyToShards.apply(group, *needs)
            copied = iter(copied if isinstance(copied, tuple) else (copied,))
            x = next(copied) if x.requires_grad else x
            offset = next(copied) if offset.requires_grad else offset
    return x, offset


class LatentShard:
    """Mixin of a module that holds one rank's rows of a dictionary's latents (`group`). The
    module defines `sharded_rows()`: the names of the tensors split by rows and into how many
    row groups (a tensor whose rows are [groups, n, ...] keeps rows [start, end) of every
    group); the rest is replicated, gradients of sharded tensors are local, of replicated ones
    the same on every rank. It also defines `whole_blueprint()`: an empty whole module of the
    same kind, for gather_full. LatentShardedTopK and framework/clt_sharding.py's
    LatentShardedCLT are the two."""

    group = None

    def sharded_parameters(self) -> list[nn.Parameter]:
        named = dict(self.named_parameters())
        return [named[name] for name in self.sharded_rows() if name in named]

    def replicated_parameters(self) -> list[nn.Parameter]:
        sharded = set(self.sharded_rows())
        return [p for name, p in self.named_parameters() if name not in sharded]

    # -- group-wide helpers ---------------------------------------------------------------
    def tp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a (non-differentiable) tensor over the latent shards, e.g. L0 = tp_sum((values
        != 0).sum(1).float()).mean(), or the number of dead latents for AuxK's scale."""
        return _all_reduce(t.detach().clone(), self.group)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients (sharded ones summed over the group, b_dec once)."""
        sharded = [p.grad for p in self.sharded_parameters() if p.grad is not None]
        repl = [p.grad for p in self.replicated_parameters() if p.grad is not None]
        ref = (sharded or repl)[0]
        sq = torch.zeros((), dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32, device=ref.device)
        for g in sharded:
            sq += g.pow(2).sum().to(sq.dtype)
        sq = _all_reduce(sq.reshape(1), self.group)[0]
        for g in repl:
            sq += g.pow(2).sum().to(sq.dtype)
        return sq.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ with the norm of the whole (unsharded) model."""
        total = self.grad_norm()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total

    @torch.no_grad()
    def sync_data_parallel_grads(self, dp_group, average: bool = True) -> None:
        """Average (or sum) every gradient over the data-parallel group: one packed all_reduce.
        Call after backward, before project/clip/step. No-op for a dp group of size 1."""
        if dp_group is None or dist.get_world_size(dp_group) == 1:
            return
        params = [p for p in self.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        _all_reduce(flat, dp_group)
        if average:
            flat /= dist.get_world_size(dp_group)
        pos = 0
        for p in params:
            p.grad.copy_(flat[pos : pos + p.numel()].view_as(p))
            pos += p.numel()



@dataclass
class ShardedSAEOutput(SAEOutput):
    """SAEOutput of a latent shard: x_hat is the full (replicated) reconstruction; values and
    indices are THIS shard's slots [B, k_loc] (values 0 where a slot is not in the global top k;
    indices are global latent ids, `local_indices` = indices - start)."""

    start: int = 0

    @property
    def local_indices(self) -> torch.Tensor:
        return self.indices - self.start


# -- the sharded module ---------------------------------------------------------------------
class LatentShardedTopK(LatentShard, SAEBase):
    """One rank's shard of a TopK (or AbsTopK) SAE/transcoder, split over latents.

    Parameters (same names as TopKSAE, so optimizers, project/renorm and state_dicts work
    per shard): encoder_weight [n/W, d_in], encoder_bias [n/W], decoder_weight [n/W, d_out]
    sharded; b_dec [d_out] replicated. Every rank of `group` must call every method that
    communicates (forward, encode, decode, clip_grad_norm_, tp_sum, gather_*) in the same order.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, *, group=None, rank: int | None = None,
                 world: int | None = None, d_out: int | None = None, use_abs: bool = False,
                 kind: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device=None, backend: str = "auto"):
        super().__init__()
        self.group = group
        if dist.is_available() and dist.is_initialized():
            g_rank, g_world = shard_group(group)
            if (rank is not None and rank != g_rank) or (world is not None and world != g_world):
                raise ValueError(f"rank/world ({rank}, {world}) disagree with the process group "
                                 f"({g_rank}, {g_world})")
            rank, world = g_rank, g_world
        elif rank is None and world is None:
            rank, world = 0, 1  # no process group: one shard, no collectives (a plain TopK SAE)
        elif rank is None or world is None:
            raise ValueError("torch.distributed is not initialised: pass both rank and world (then only "
                             "world=1 or local methods work), or init the process group first")
        self.rank, self.world = rank, world
        self.start, self.end = shard_range(n_latents, rank, world)
        self.n_latents, self.n_local, self.k = n_latents, self.end - self.start, k
        self.use_abs = use_abs
        self.kind = kind or ("abstopk" if use_abs else "topk")
        self.backend = backend
        # Fresh init of this shard only (a full model never exists): the draw depends on
        # (seed, rank): statistically like TopKSAE's init, not the same numbers; use
        # `from_full` to shard a given model exactly.
        g = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self._make_parameters(self.n_local, d_in, d_out or d_in, d_out is not None, g, dtype, device)

    # -- constraints: row-local or replicated, so exact per shard (units: SAEBase) ----------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove each decoder row's radial gradient component (rows are local: no comms)."""
        w, g = self.decoder_weight, self.decoder_weight.grad
        if g is not None:
            g.copy_(kernels.project_out_radial(g, w))

    def sharded_rows(self) -> dict[str, int]:
        return {"encoder_weight": 1, "encoder_bias": 1, "decoder_weight": 1}

    def whole_blueprint(self) -> TopKSAE:
        with torch.device("meta"):  # no n x d random init just to overwrite it
            return SAE_KINDS[self.kind](self.d_in, self.n_latents, self.k, d_out=self.d_out if self.is_transcoder else None)

    # -- math -----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, k: int | None = None, latent_mask: torch.Tensor | None = None):
        """(values [B, k_loc], global indices [B, k_loc]) of this shard's latents in the global
        top k (values 0 elsewhere). latent_mask: this shard's [n_local] bool mask (e.g. dead
        latents for AuxK); pass mask[start:end] of a global mask."""
        k = k or self.k
        k_loc = min(k, self.n_local)
        x, offset = self._encoder_inputs(x)
        values, idx = kernels.topk_encode(x, self.encoder_weight, self.encoder_bias, offset, k_loc,
                                          use_abs=self.use_abs, latent_mask=latent_mask, backend=self.backend)
        score = values.detach().abs() if self.use_abs else values.detach()
        keep = _global_keep(score, idx, k, self.group, self.rank, self.world)
        values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
        return values, idx + self.start

    def decode(self, values: torch.Tensor, indices: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """Full x_hat from this shard's codes (global indices): local sparse decode, one
        all_reduce(sum), + b_dec (replicated)."""
        partial = kernels.sparse_decode(values, indices - self.start, self.decoder_weight, backend=self.backend)
        out = _ReduceFromShards.apply(partial, self.group)
        return out + self.b_dec if with_bias else out

    def forward(self, x: torch.Tensor, k: int | None = None, batch=None) -> ShardedSAEOutput:
        values, indices = self.encode(x, k)
        return ShardedSAEOutput(self.decode(values, indices), values, indices, start=self.start)

    def _encoder_inputs(self, x: torch.Tensor):
        return copy_inputs_to_shards(self.group, x, self.input_offset())

    def encode_rows(self, x: torch.Tensor, rows: torch.Tensor, k: int):
        """Global top k among the latents `rows` only (global ids, the same on every rank; e.g.
        AuxK's dead latents): (values [B, k], global indices [B, k]), values 0 in slots not kept.
        Each shard multiplies only its own rows of `rows` (cost B*d*len(rows)/W, not another
        full encoder pass). Every rank must call it, also without local rows: it joins the
        candidate gather and, in backward, b_dec's gradient reduce."""
        local = rows[(rows >= self.start) & (rows < self.end)] - self.start
        x, offset = self._encoder_inputs(x)
        B, k_here = x.shape[0], min(k, local.numel())
        dtype = torch.promote_types(x.dtype, self.encoder_weight.dtype)  # the kernel's value dtype
        values = x.new_zeros(B, k, dtype=dtype)
        idx = torch.zeros(B, k, dtype=torch.long, device=x.device)
        score = torch.full((B, k), -1.0, dtype=dtype, device=x.device)  # padding: below every real score
        if k_here:
            v, sub = kernels.topk_encode(x, self.encoder_weight[local], self.encoder_bias[local], offset, k_here,
                                         use_abs=self.use_abs, backend=self.backend)
            values = torch.cat([v, values[:, k_here:]], dim=1)
            idx[:, :k_here] = local[sub]
            score[:, :k_here] = v.detach().abs() if self.use_abs else v.detach()
        elif offset.requires_grad:
            values = values + 0 * offset.sum()  # b_dec's backward reduce must run on every rank
        keep = _global_keep(score, idx, k, self.group, self.rank, self.world)
        values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
        return values, idx + self.start

    def after_step(self, out) -> None:
        """TopK/AbsTopK keep no state between steps (the trainer calls this like TopKSAE's)."""

    def shard_meta(self) -> dict:
        """What a per-rank (sharded) checkpoint needs besides state_dict()."""
        return {"rank": self.rank, "world": self.world, "start": self.start, "end": self.end,
                "n_latents": self.n_latents, "d_in": self.d_in, "d_out": self.d_out, "k": self.k,
                "kind": self.kind, "is_transcoder": self.is_transcoder}


# -- conversion from / to a full model ----------------------------------------------------
def _topk_shard(sae: TopKSAE, group=None, backend: str = "auto", rank: int | None = None,
                world: int | None = None) -> LatentShardedTopK:
    if type(sae).forward is not TopKSAE.forward:
        raise ValueError(f"{type(sae).__name__} overrides forward(); only TopK selection is sharded")
    kind = next((name for name in SAE_KINDS if SAE_KINDS[name] is type(sae)), None)
    shard = LatentShardedTopK(sae.d_in, sae.n_latents, sae.k, group=group, rank=rank, world=world,
                              d_out=sae.d_out if sae.is_transcoder else None, use_abs=sae.use_abs,
                              kind=kind, backend=backend, dtype=sae.encoder_weight.dtype,
                              device=sae.encoder_weight.device)
    shard.load_state_dict(shard_state(shard, sae.state_dict()))
    return shard


SHARD_LAYOUTS.register("topk")(_topk_shard)
SHARD_LAYOUTS.register("abstopk")(_topk_shard)


def from_full(sae, rank: int | None = None, world: int | None = None, group=None, backend: str = "auto"):
    """This rank's shard of a whole SAE of a shardable kind (parameters copied, same dtype and
    device; `rank`/`world` only for TopK without a process group)."""
    kind = next((name for name in SHARD_LAYOUTS if SAE_KINDS[name] is type(sae)), None)
    if kind is None:
        raise ValueError(f"{type(sae).__name__} has no latent-shard layout (shardable kinds: {sorted(SHARD_LAYOUTS)})")
    extra = {"rank": rank, "world": world} if rank is not None or world is not None else {}
    return SHARD_LAYOUTS[kind](sae, group=group, backend=backend, **extra)


def _take_rows(t: torch.Tensor, groups: int, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of each of the `groups` equal row groups of t."""
    return t.reshape(groups, -1, *t.shape[1:])[:, start:end].reshape(-1, *t.shape[1:])


def shard_state(shard: LatentShard, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of a whole model's state_dict (the whole kind's names): its rows of the
    sharded tensors, the replicated ones as they are. Inverse of gather_state."""
    rows = shard.sharded_rows()
    return {k: _take_rows(v, rows[k], shard.start, shard.end) if k in rows else v for k, v in state.items()}


def gather_tensor(local: torch.Tensor, group, world: int, dst: int | None = None) -> torch.Tensor | None:
    """Concatenate per-shard tensors along dim 0 (group-rank order): on every rank, or on group
    rank `dst` only (None elsewhere; saves memory for export)."""
    local = local.detach().contiguous()
    if world == 1:
        return local.clone()
    if dst is None:
        return _all_gather(local, group, world).reshape(-1, *local.shape[1:])
    CommCounter.record("gather", local)
    me = dist.get_rank(group)
    parts = [torch.empty_like(local) for _ in range(world)] if me == dst else None
    dist.gather(local, parts, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
    return torch.cat(parts) if me == dst else None


def _gather_rows(local: torch.Tensor, groups: int, shard: LatentShard, dst: int | None) -> torch.Tensor | None:
    """Inverse of _take_rows over the group: every rank's rows, group by group."""
    parts = gather_tensor(local, shard.group, shard.world, dst)  # [world * groups * rows, ...]
    if parts is None or groups == 1:
        return parts
    return parts.reshape(shard.world, groups, -1, *local.shape[1:]).transpose(0, 1).reshape(-1, *local.shape[1:])


def gather_state(shard: LatentShard, dst: int | None = None) -> dict[str, torch.Tensor] | None:
    """The whole model's state_dict on every rank, or on group rank dst only."""
    rows = shard.sharded_rows()
    local = shard.state_dict()
    state = {k: _gather_rows(local[k], groups, shard, dst) for k, groups in rows.items()}
    if dst is not None and shard.rank != dst:
        return None
    state.update({k: v.detach().clone() for k, v in local.items() if k not in rows})
    return {k: state[k] for k in local}


def gather_full(shard: LatentShard, dst: int | None = None):
    """Reassemble the whole SAE for export / single-device checkpoints; on every rank, or on
    group rank dst only (None elsewhere)."""
    state = gather_state(shard, dst)
    if state is None:
        return None
    sae = shard.whole_blueprint()
    sae.load_state_dict(state, assign=True)
    return sae


def _map_row_states(shard: LatentShard, opt_state: dict, whole: bool, fn) -> dict:
    """Copy of a torch optimizer state_dict (of an optimizer over list(shard.parameters())) with
    fn(t, groups) applied to each state tensor that follows a sharded parameter row by row (Adam's
    moments, schedule-free's z: the parameter's shape, local or (`whole`) the whole model's); step
    counters, hyperparameters and the replicated parameters' state stay as they are. Same order
    on every rank."""
    rows = shard.sharded_rows()
    names = [name for name, _ in shard.named_parameters()]
    params = list(shard.parameters())
    out = {**opt_state, "state": {}}
    for i, st in opt_state["state"].items():
        groups = rows.get(names[i])
        shape = tuple(params[i].shape)
        if groups is not None and whole:
            shape = (shape[0] * shard.world, *shape[1:])
        out["state"][i] = {key: fn(v, groups) if groups and torch.is_tensor(v) and tuple(v.shape) == shape else v
                           for key, v in st.items()}
    return out


def gather_optimizer_state(shard: LatentShard, state: dict, dst: int | None = 0) -> dict | None:
    """A runner's {"optimizer": state_dict, ...} in the whole model's layout, as an unsharded run
    would save it: the per-row state of the sharded parameters gathered over the group, on
    group rank dst (None elsewhere; on every rank with dst=None). Collective."""
    gather = lambda t, groups: _gather_rows(t, groups, shard, dst)  # noqa: E731
    whole = {**state, "optimizer": _map_row_states(shard, state["optimizer"], False, gather)}
    return whole if dst is None or shard.rank == dst else None


def shard_optimizer_state(shard: LatentShard, state: dict) -> dict:
    """Inverse of gather_optimizer_state: this rank's rows of a whole-layout optimizer state."""
    take = lambda t, groups: _take_rows(t, groups, shard.start, shard.end).clone()  # noqa: E731
    return {**state, "optimizer": _map_row_states(shard, state["optimizer"], True, take)}


# -- 2-D (dp, tp) mesh ----------------------------------------------------------------------
def init_mesh(dp: int, tp: int, device_type: str = "cpu"):
    """(dp_group, tp_group, mesh) of a ("dp", "tp") device mesh over the default process group
    (global rank = dp_index * tp + tp_index: a tp group is tp consecutive ranks, e.g. one node).
    Give every rank of a tp group the same batch, and each dp index its own batches."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return mesh.get_group("dp"), mesh.get_group("tp"), mesh
