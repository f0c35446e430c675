"""Cross-layer transcoders (kind `clt`, Ameisen et al. 2025): over contiguous layers A..B, the
latents of layer L read `blocks.L.resid_mid` (the MLP's input side) and write to the MLP
output of every layer L' >= L; layer L' is reconstructed from the latents of all layers <= L'.

As one activation row the CLT reads the stacked site `blocks.A-B.resid_mid` and writes
`blocks.A-B.mlp_out` (framework/hooks.py), so the buffer, runners and checkpoints treat it as
one transcoder with d_in = d_out = n_layers * d_model and n_layers * n_latents latents
(`saes.N.n_latents` and `k` are per layer: each layer keeps its own top k). Parameters:

    encoder_weight [n_layers * n_latents, d_model]   row r reads layer r // n_latents
    encoder_bias   [n_layers * n_latents]
    decoders.i     [n_latents, n_layers - i, d_model] layer i's latents -> layers i..B
    b_dec          [n_layers * d_model]

Decoder memory grows as n_latents * d_model * n(n+1)/2 (README). Each latent's decoder (all
its target layers together) is kept at unit norm. Normalisation is per layer (every layer's
input and target scaled to E||.||^2 = d_model), and the loss is the mean over layers of each
layer's normalised MSE (the sum of per-layer FVUs over n: the same minimiser, with aux_coef and
lr on the scale of one FVU), so a layer with a large MLP output does not drown the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from framework import hooks
from framework.losses import TrainingBatch
from framework.sae import B_DEC_INIT, SAE_KINDS, SAEBase, SAEOutput
from framework.variants.common import require, threshold_select
from framework.variants.jumprelu import JumpReLUOptions, JumpReLUThresholds

INPUT_KIND, OUTPUT_KIND = "resid_mid", "mlp_out"


def parse_layers(value) -> list[int]:
    """`[2, 3, 4]` or `"2-4"` -> [2, 3, 4]; anything else, gaps or a descending order fail."""
    require(bool(value), "options.layers: required for kind clt: the contiguous layers it spans, e.g. [0, 1, 2] "
                         "or '0-5'")
    if isinstance(value, str):
        parts = value.split("-")
        require(len(parts) == 2 and all(p.strip().isdigit() for p in parts),
                f"options.layers: '{value}' is not a layer range; write e.g. '0-5' or a list [0, 1, 2]")
        first, last = int(parts[0]), int(parts[1])
        require(first <= last, f"options.layers: '{value}' is empty (write the lower layer first)")
        return list(range(first, last + 1))
    layers = list(value)
    require(all(L >= 0 for L in layers), f"options.layers: {layers} has a negative layer")
    require(layers == list(range(layers[0], layers[0] + len(layers))),
            f"options.layers: {layers} is not contiguous and ascending (a CLT's latents write to every later layer "
            "of one range), e.g. {list(range(layers[0], layers[0] + len(layers)))}")
    return layers


class _ShiftedSum(torch.autograd.Function):
    """sum_i of part_i [B, (n - i) d] placed at column i d of [B, n d]; backward hands each part
    its view of the gradient (autograd's pad or in-place slice adds copy the whole width once
    per layer, forward or backward)."""

    @staticmethod
    def forward(ctx, d: int, *parts):
        ctx.d, ctx.n = d, len(parts)
        out = parts[0].new_zeros(parts[0].shape[0], parts[0].shape[1])
        for i, part in enumerate(parts):
            out[:, i * d:] += part
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, *(grad[:, i * ctx.d:] for i in range(ctx.n)))


@dataclass
class CLTOptions:
    layers: list[int] | str = ""  # the contiguous layers the CLT spans: [0, 1, 2] or "0-5"

    def __post_init__(self):
        self.layers = parse_layers(self.layers)


@SAE_KINDS.register("clt")
class CrossLayerTranscoder(SAEBase):
    """TopK cross-layer transcoder (module docstring). Inputs/targets are stacked rows."""

    Options = CLTOptions
    export_architecture = "clt"
    export_format = "clt"
    export_activation = "topk"  # circuit-tracer's activation (framework/clt_export.py)
    cross_layer = True
    use_abs = False

    @classmethod
    def configured_sites(cls, options: CLTOptions) -> tuple[str, str]:
        return hooks.stacked_site(INPUT_KIND, options.layers), hooks.stacked_site(OUTPUT_KIND, options.layers)

    @classmethod
    def shape_from_weights(cls, weights: dict, options: CLTOptions, transcoder: bool) -> tuple[int, int, int]:
        n = len(options.layers)
        rows, d = weights["encoder_weight"].shape
        return d * n, rows // n, weights["b_dec"].shape[0]

    def __init__(self, d_in: int, n_latents: int, k: int, d_out: int | None = None, seed: int = 0, options=None):
        super().__init__()
        self.options = options if options is not None else CLTOptions(layers=[0])
        self.layers = list(self.options.layers)
        n = self.n_layers = len(self.layers)
        d_out = d_out or d_in
        if d_in % n or d_out % n:
            raise ValueError(f"clt: stacked widths {d_in} -> {d_out} are not multiples of its {n} layers")
        self.d_model_in, self.d_model = d_in // n, d_out // n
        self.d_in, self.d_out, self.is_transcoder = d_in, d_out, True
        self.per_layer, self.k = n_latents, k
        self.n_latents = n * n_latents
        g = torch.Generator().manual_seed(seed)
        decoders = []
        for i in range(n):
            dec = torch.randn(n_latents, n - i, self.d_model, generator=g)
            decoders.append(nn.Parameter(dec / dec.flatten(1).norm(dim=1)[:, None, None]))
        self.encoder_weight = nn.Parameter(torch.randn(self.n_latents, self.d_model_in, generator=g)
                                           / math.sqrt(self.d_model_in))
        self.encoder_bias = nn.Parameter(torch.zeros(self.n_latents))
        self.decoders = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("input_scale", torch.ones(n))  # per layer
        self.register_buffer("output_scale", torch.ones(n))

    # -- units ----------------------------------------------------------------------------
    def _per_dim(self, scale: torch.Tensor, width: int) -> torch.Tensor:
        return scale.repeat_interleave(width)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._per_dim(self.input_scale, self.d_model_in)

    def normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._per_dim(self.output_scale, self.d_model)

    def denormalize_target(self, y: torch.Tensor) -> torch.Tensor:
        return y / self._per_dim(self.output_scale, self.d_model)

    def normalize_lm_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self._per_dim(self.output_scale, self.d_model)

    def input_offset(self) -> torch.Tensor:
        return self.b_dec.new_zeros(self.d_model_in)

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, normalize: bool, b_dec_init: str) -> None:
        """Per-layer scales (E||x_L||^2 = d_model for every layer) and b_dec from a sample."""
        if normalize:
            n = self.n_layers
            self.input_scale.copy_((self.d_model_in / x.view(-1, n, self.d_model_in).pow(2).sum(2).mean(0)).sqrt())
            self.output_scale.copy_((self.d_model / y.view(-1, n, self.d_model).pow(2).sum(2).mean(0)).sqrt())
        self.b_dec.copy_(B_DEC_INIT[b_dec_init](self.normalize_target(y)).to(self.b_dec.dtype))

    # -- decoder constraint ---------------------------------------------------------------
    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return list(self.decoders)

    @torch.no_grad()
    def renorm_decoder(self) -> None:
        for dec in self.decoders:
            dec /= dec.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

    # -- export (framework/clt_export.py) --------------------------------------------------------
    def clt_export_extra(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors beyond weights and biases, in the export's units (the codes')."""
        return {}

    def load_clt_export_extra(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of clt_export_extra on an export loaded with unit scales."""

    # -- math ------------------------------------------------------------------------------
    def _rows(self, i: int) -> slice:
        return slice(i * self.per_layer, (i + 1) * self.per_layer)

    def _layer_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x[:, i * self.d_model_in:(i + 1) * self.d_model_in]

    def layer_encoders(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, views of its encoder rows and biases. One autograd node for all layers:
        slicing the stacked parameter per layer would give every slice's backward a zero-filled
        gradient of the whole encoder (12 x 56 MB per step for SmolLM2 layers 0-5 with AuxK)."""
        weights = self.encoder_weight.view(self.n_layers, -1, self.encoder_weight.shape[1]).unbind(0)
        return list(zip(weights, self.encoder_bias.view(self.n_layers, -1).unbind(0)))

    def encode_layer(self, x_layer: torch.Tensor, i: int, k: int | None = None, encoder=None):
        """Top k of layer i's latents on that layer's (normalised) input: (values, local ids).
        `encoder`: layer i's entry of layer_encoders() (a forward over all layers passes it)."""
        weight, bias = encoder or self.layer_encoders()[i]
        return kernels.topk_encode(x_layer, weight, bias, self.input_offset(), k or self.k)

    def _decoder_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a layer's decoder that hold its latents `ids` (a latent shard's differ)."""
        return ids

    def _sum_partial(self, partial: torch.Tensor) -> torch.Tensor:
        """The whole reconstruction from this module's part of it (a latent shard's is summed)."""
        return partial

    def _decode_groups(self, groups) -> torch.Tensor:
        """sum over source layers i of (values_i, local ids_i) decoded into layers i..B."""
        parts = [kernels.sparse_decode(values, self._decoder_rows(ids), self.decoders[i].flatten(1))
                 for i, (values, ids) in enumerate(groups)]
        return self._sum_partial(_ShiftedSum.apply(self.d_model, *parts))

    def decode(self, values: torch.Tensor, indices: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """Any (values, global latent ids) (e.g. AuxK's dead latents, from any layers)."""
        out = self._decode_groups(self._split_by_layer(values, indices))
        return out + self.b_dec if with_bias else out

    def _split_by_layer(self, values: torch.Tensor, indices: torch.Tensor):
        """Per layer, its entries of each row, left-packed: [(values_i [B, w_i], local ids_i)],
        w_i = the most any row has (padding: value 0 at an id of the row, so one this module
        holds). Each entry is then decoded into its own layer's targets only (AuxK's k_aux =
        d_in / 2 slots of a stacked input are many); one stable sort by layer and one host sync
        for all layers."""
        B, width = indices.shape
        layer = indices // self.per_layer
        order = layer.argsort(dim=1, stable=True)
        values, local = values.gather(1, order), (indices - layer * self.per_layer).gather(1, order)
        counts = torch.zeros(B, self.n_layers, dtype=torch.long, device=indices.device).scatter_add_(
            1, layer, torch.ones_like(layer))
        starts = counts.cumsum(1) - counts
        groups = []
        for i, w in enumerate(counts.max(0).values.clamp_min(1).tolist()):
            slot = torch.arange(w, device=indices.device)
            here = slot < counts[:, i:i + 1]
            pos = (starts[:, i:i + 1] + slot).clamp_max(width - 1)
            groups.append((torch.where(here, values.gather(1, pos), 0), local.gather(1, pos)))
        return groups

    def forward(self, x: torch.Tensor, k: int | None = None, batch: TrainingBatch | None = None) -> SAEOutput:
        encoders = self.layer_encoders()
        groups = [self.encode_layer(self._layer_input(x, i), i, k, encoders[i]) for i in range(self.n_layers)]
        values = torch.cat([v for v, _ in groups], 1)
        indices = torch.cat([ids + i * self.per_layer for i, (_, ids) in enumerate(groups)], 1)
        return SAEOutput(self._decode_groups(groups) + self.b_dec, values, indices)

    def encode_rows(self, x: torch.Tensor, rows: torch.Tensor, k: int):
        """Top k over the latents `rows` (any layers), each on its own layer's input."""
        values, ids = self._row_candidates(x, rows, k)
        top = values.detach().topk(min(k, values.shape[1]), dim=1).indices
        return values.gather(1, top), ids.gather(1, top)

    def _held_rows(self, ids: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Of layer i's latents `ids` (whole ids), those this module holds and their rows in its
        layer i encoder."""
        return ids, ids - i * self.per_layer

    def _row_candidates(self, x: torch.Tensor, rows: torch.Tensor, k: int):
        """Per layer, the top k of the latents `rows` this module holds: (values, whole ids),
        concatenated over layers ([B, 0] when it holds none)."""
        values, ids = [x.new_zeros(x.shape[0], 0)], [rows.new_zeros(x.shape[0], 0)]
        layer = rows // self.per_layer
        for i, (weight, bias) in enumerate(self.layer_encoders()):
            held, params = self._held_rows(rows[layer == i], i)
            if held.numel():
                v, sub = kernels.topk_encode(self._layer_input(x, i), weight[params], bias[params], self.input_offset(),
                                             min(k, held.numel()))
                values.append(v)
                ids.append(held[sub])
        return torch.cat(values, 1), torch.cat(ids, 1)

    def reconstruction_loss(self, x_hat: torch.Tensor, batch: TrainingBatch) -> torch.Tensor:
        """Mean over layers of each layer's normalised MSE (module docstring)."""
        d = self.d_model
        return sum(batch.normalized_mse(x_hat[:, i * d:(i + 1) * d], batch.target[:, i * d:(i + 1) * d])
                   for i in range(self.n_layers)) / self.n_layers

    def training_batch(self, x: torch.Tensor, batch: TrainingBatch | None) -> TrainingBatch:
        return batch if batch is not None else TrainingBatch(target=None)

    def after_step(self, out: SAEOutput) -> None:
        """No running state."""

    @property
    def output_layers(self) -> list[int]:
        return self.layers

    def splice_predictor(self):
        """predict(j, raw input of layer j) -> raw reconstruction of layer j's MLP output, called
        for j = 0, 1, ... in order (a replacement forward): layer j's codes are kept for the
        later layers' reconstructions."""
        codes = []
        d = self.d_model

        @torch.no_grad()
        def predict(j: int, x_raw: torch.Tensor) -> torch.Tensor:
            if j != len(codes):
                raise RuntimeError(f"clt predictor: layer {j} asked before layer {len(codes)}")
            codes.append(self.encode_layer(x_raw.float() * self.input_scale[j], j))
            out = None
            for i, (values, ids) in enumerate(codes):
                part = kernels.sparse_decode(values, self._decoder_rows(ids), self.decoders[i][:, j - i].contiguous())
                out = part if out is None else out + part
            return (self._sum_partial(out) + self.b_dec[j * d:(j + 1) * d]) / self.output_scale[j]

        return predict


@dataclass
class JumpReLUCLTOptions(JumpReLUOptions, CLTOptions):
    """CLTOptions and JumpReLUOptions; `target_l0` (default the config's `k`), `l0_coef` and the
    threshold init are per layer: the controller steers the sum over layers to n_layers * target."""

    def __post_init__(self):
        CLTOptions.__post_init__(self)
        JumpReLUOptions.__post_init__(self)


@SAE_KINDS.register("jumprelu_clt")
class JumpReLUCrossLayerTranscoder(JumpReLUThresholds, CrossLayerTranscoder):
    """A CLT whose latents fire above per-latent learned thresholds (circuit-tracer's own CLT
    activation), trained as JumpReLU SAEs are (framework/variants/jumprelu.py): one sparsity
    coefficient for all layers, each layer's selection on its own input."""

    Options = JumpReLUCLTOptions
    export_architecture = "jumprelu_clt"
    export_activation = "jumprelu"

    def __init__(self, d_in: int, n_latents: int, k: int, d_out: int | None = None, seed: int = 0, options=None):
        super().__init__(d_in, n_latents, k, d_out=d_out, seed=seed, options=options)
        for i in range(self.n_layers):
            self._scale_encoder_rows(self._rows(i), self.d_model_in, self.per_layer)
        self._init_thresholds(self.n_latents)

    def target_l0(self) -> float:
        return self.n_layers * super().target_l0()

    def _layer_width(self) -> int:
        return self._start_width(self.target_l0() / self.n_layers, self.per_layer)

    def encode_layer(self, x_layer: torch.Tensor, i: int, k: int | None = None, encoder=None):
        """Layer i's latents above their thresholds (inference): (values, local ids)."""
        weight, bias = encoder or self.layer_encoders()[i]
        return threshold_select(x_layer, weight, bias, self.input_offset(), self.threshold()[self._rows(i)].detach(),
                                self._layer_width())

    def forward(self, x: torch.Tensor, k: int | None = None, batch: TrainingBatch | None = None) -> SAEOutput:
        if not self.training:
            return super().forward(x, k, batch)
        theta, width = self.threshold(), self._layer_width()
        groups, penalty, next_width = [], 0, 0
        for i, (weight, bias) in enumerate(self.layer_encoders()):
            values, ids, layer_penalty, needed = self._training_codes(
                self._layer_input(x, i), weight, bias, self.input_offset(), theta[self._rows(i)], width)
            groups.append((values, ids))
            penalty, next_width = penalty + layer_penalty, max(next_width, needed)
        values = torch.cat([v for v, _ in groups], 1)
        indices = torch.cat([ids + i * self.per_layer for i, (_, ids) in enumerate(groups)], 1)
        out = SAEOutput(self._decode_groups(groups) + self.b_dec, values, indices)
        return self._with_penalty(out, penalty, next_width, self.training_batch(x, batch))

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, normalize: bool, b_dec_init: str) -> None:
        super().init_from_sample(x, y, normalize, b_dec_init)
        if self.options.threshold_init == 0:
            xn = self.normalize_input(x.to(self.encoder_weight))
            for i in range(self.n_layers):
                self._init_threshold_rows(self._layer_input(xn, i), self._rows(i), self.target_l0() / self.n_layers,
                                          self.input_offset())

    def clt_export_extra(self, i: int) -> dict[str, torch.Tensor]:
        # the export's codes are ours (normalised units, see framework/clt_export.py): so is theta
        return {f"threshold_{i}": self.threshold()[self._rows(i)].detach()}

    def load_clt_export_extra(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        self.log_threshold[self._rows(i)] = self._param_of(tensors[f"threshold_{i}"].to(self.log_threshold))
