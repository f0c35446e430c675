"""Latent sharding of a cross-layer transcoder (`dist.latent_shards` with kind `clt`).

Rank r of W in a latent-shard group holds, of EVERY spanned layer's m latents, the slice
[start, end) = [r m/W, (r+1) m/W) (`shard_range`): its encoder rows and biases of each layer and
the same rows of each layer's decoder block `decoders.i` [m/W, n - i, d]. So a shard holds 1/W of
the n(n+1)/2 decoder blocks' memory whatever the number of layers, and every layer's selection
is spread over all ranks (no rank waits on one layer's work). b_dec and the per-layer scales
are replicated.

Per step: each layer's fused top k on the shard's rows (k_loc = min(k, m/W) candidates per
token), one all_gather of the candidate values per layer and the global per-layer top k from
them (`_global_keep`, the tie rule of framework/tensor_parallel.py), the shard's partial
reconstruction of every layer, and ONE all_reduce of it ([B, n d]). Latent ids in outputs,
firing counts and checkpoints are the whole CLT's (layer i's latent j is i m + j), so the
trainer, evaluation, checkpoints and exports see the whole model's layout; `sharded_rows`
tells framework/tensor_parallel.py how to cut and gather it (encoder rows: n row groups).

Communication per step (fp32, B tokens, n layers, d = d_model): n all_gathers of B k_loc values
(W n B k_loc 4 bytes received) and one all_reduce of B n d floats (AuxK: one more gather of
B k_aux and all_reduce of B n d). As for SAEs the all_reduce dominates: it is what one process
would compute, split W ways.
"""

from __future__ import annotations

import torch

import kernels
from framework.tensor_parallel import (
    SHARD_LAYOUTS,
    LatentShard,
    _global_keep,
    _ReduceFromShards,
    copy_inputs_to_shards,
    shard_group,
    shard_range,
    shard_state,
)
from framework.variants.clt import CrossLayerTranscoder


class LatentShardedCLT(LatentShard, CrossLayerTranscoder):
    """One rank's latents of a TopK CLT (module docstring); every rank of `group` must call
    every method that communicates (forward, encode_layer, encode_rows, decode) in the same order."""

    def __init__(self, whole: CrossLayerTranscoder, group=None, backend: str = "auto"):
        rank, world = shard_group(group)
        start, end = shard_range(whole.per_layer, rank, world)
        super().__init__(whole.d_in, end - start, whole.k, d_out=whole.d_out, options=whole.options)
        self.group, self.rank, self.world, self.backend = group, rank, world, backend
        self.start, self.end, self.local = start, end, end - start
        self.per_layer, self.n_latents = whole.per_layer, whole.n_latents  # ids are the whole CLT's
        self.to(dtype=whole.encoder_weight.dtype, device=whole.encoder_weight.device)
        self.load_state_dict(shard_state(self, whole.state_dict()))

    # -- layout (framework/tensor_parallel.py) ----------------------------------------------------
    def sharded_rows(self) -> dict[str, int]:
        return {"encoder_weight": self.n_layers, "encoder_bias": self.n_layers,
                **{f"decoders.{i}": 1 for i in range(self.n_layers)}}

    def whole_blueprint(self) -> CrossLayerTranscoder:
        return CrossLayerTranscoder(self.d_in, self.per_layer, self.k, d_out=self.d_out, options=self.options)

    def _rows(self, i: int) -> slice:
        return slice(i * self.local, (i + 1) * self.local)

    def _decoder_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.start

    def _sum_partial(self, partial: torch.Tensor) -> torch.Tensor:
        return _ReduceFromShards.apply(partial, self.group)

    # -- selection ----------------------------------------------------------------------------------
    def encode_layer(self, x_layer: torch.Tensor, i: int, k: int | None = None, encoder=None):
        """Layer i's global top k, this shard's part: (values, ids within the layer), values 0
        in the slots of candidates another shard wins."""
        k = k or self.k
        weight, bias = encoder or self.layer_encoders()[i]
        x_layer, offset = copy_inputs_to_shards(self.group, x_layer, self.input_offset())
        values, ids = kernels.topk_encode(x_layer, weight, bias, offset, min(k, self.local), backend=self.backend)
        keep = _global_keep(values.detach(), ids, k, self.group, self.rank, self.world)
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)), ids + self.start

    def _held_rows(self, ids: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        within = ids - i * self.per_layer
        mine = (within >= self.start) & (within < self.end)
        return ids[mine], within[mine] - self.start

    def encode_rows(self, x: torch.Tensor, rows: torch.Tensor, k: int):
        """The group's top k among the latents `rows` (whole ids, the same list on every rank,
        e.g. AuxK's dead latents), this shard's part: (values [B, k], whole ids [B, k]), values 0
        in slots another shard wins. Each shard multiplies only its own rows; every rank must
        call it, also without any (it joins the candidate gather)."""
        v, i = self._row_candidates(x, rows, k)
        top = v.detach().topk(min(k, v.shape[1]), dim=1).indices
        v, i = v.gather(1, top), i.gather(1, top)
        B, width = v.shape
        values = torch.cat([v, v.new_zeros(B, k - width)], 1)
        ids = torch.cat([i, i.new_full((B, k - width), self.start)], 1)  # padding: a latent of ours, value 0
        score = torch.cat([v.detach(), v.new_full((B, k - width), -1.0)], 1)  # below every real score
        keep = _global_keep(score, ids, k, self.group, self.rank, self.world)
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)), ids


@SHARD_LAYOUTS.register("clt")
def _clt_shard(sae: CrossLayerTranscoder, group=None, backend: str = "auto") -> LatentShardedCLT:
    return LatentShardedCLT(sae, group=group, backend=backend)
