"""Evaluation on held-out tokens.

Reconstruction metrics (reference.md §3): FVU = E||y - y_hat||^2 / E||y - mean(y)||^2 with the
mean over the whole evaluation set (not zero, and not per batch); L0; dead fraction (never fired
on the eval tokens); dense fraction (fires on > 10% of tokens); cosine and norm ratio.
With an LLM source, the reconstruction is spliced into the forward pass at the site for delta
CE, KL(clean || spliced) and CE recovered against zero ablation. Splicing replaces exactly the
positions the reconstruction metrics use (`LLMSource.sae_positions`: not special, finite, not
a norm outlier); the others keep their clean activation. CE and KL average over all predicted
positions of the held-out sequences.
A cross-layer transcoder's stacked output is spliced at every layer at once, each layer's
encoder reading the spliced forward's resid_mid (the replacement model), and the zero ablation
removes every spanned MLP; it also reports per-layer FVU (each layer's own eval-set mean), L0
and dead fraction (`fvu.layer<L>`, ...). A replacement set (`eval.replacement_sets`,
framework/replacement.py) splices several single-layer MLP transcoders the same way, all at once.
Skip transcoders also report what their linear path alone
(b_dec + x @ W_skip^T, every latent off) leaves unexplained: skip_fvu, and skip_explained =
1 - skip_fvu, the fraction of the target's variance the skip explains.

Latent-sharded SAEs are evaluated as they train, every rank of a shard group on the same
tokens: the reconstruction is replicated, while the firing counts (and so L0) are each
shard's own latents' and are summed over the shards too (`latent_reduce`).

Each SAE enters inference mode (`SAETrainer.evaluating`) once per metric pass, before its loop
over batches, in the same order on every rank: under ZeRO-3 that is a collective gather, and
ranks may hold different numbers of held-out batches.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F

from framework import hooks
from framework.errors import DataError
from framework.replacement import set_replacement

DENSE_THRESHOLD = 0.1


class ReconstructionStats:
    """Sums over the eval set in float64, so the FVU denominator uses the set's own mean."""

    def __init__(self, n_latents: int, d_out: int, device: torch.device, layers: list[int] | None = None):
        self.layers = layers or []  # a stacked output (CLT): equal slices of y, one per layer
        self.layer_err = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.layer_y2 = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.tokens = 0
        self.err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_y = torch.zeros(d_out, dtype=torch.float64, device=device)
        self.sum_y2 = torch.zeros((), dtype=torch.float64, device=device)
        self.cos = torch.zeros((), dtype=torch.float64, device=device)
        self.norm_ratio = torch.zeros((), dtype=torch.float64, device=device)
        self.fires = torch.zeros(n_latents, dtype=torch.long, device=device)  # L0 is their sum / tokens
        self.linear_err: torch.Tensor | None = None  # skip transcoders: sum ||y - linear part||^2

    def add_linear(self, y: torch.Tensor, y_linear: torch.Tensor) -> None:
        """A skip transcoder's linear path alone (b_dec + x @ W_skip^T) on the same tokens."""
        err = (y.double() - y_linear.double()).pow(2).sum()
        self.linear_err = err if self.linear_err is None else self.linear_err + err

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        y, y_hat = y.double(), y_hat.double()
        self.tokens += y.shape[0]
        self.err += (y - y_hat).pow(2).sum()
        if self.layers:
            self.layer_err += (y - y_hat).pow(2).view(y.shape[0], len(self.layers), -1).sum((0, 2))
            self.layer_y2 += y.pow(2).view(y.shape[0], len(self.layers), -1).sum((0, 2))
        self.sum_y += y.sum(0)
        self.sum_y2 += y.pow(2).sum()
        self.cos += F.cosine_similarity(y, y_hat, dim=1).sum()
        self.norm_ratio += (y_hat.norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)).sum()
        self.fires += torch.bincount(indices[values != 0], minlength=self.fires.numel())

    def reduce_(self, reduce, latent_reduce=None) -> "ReconstructionStats":
        """Sum every accumulator over ranks (each rank evaluated its own held-out shard of the
        tokens); the firing counts with `latent_reduce` (default: `reduce`), which also sums
        over latent shards."""
        linear = self.err.new_zeros(1) if self.linear_err is None else self.linear_err.reshape(1)
        packed = torch.cat([self.err.reshape(1), self.sum_y2.reshape(1), self.cos.reshape(1), self.norm_ratio.reshape(1),
                            self.err.new_tensor([self.tokens]), linear, self.layer_err, self.layer_y2, self.sum_y])
        packed = reduce(packed)
        self.err, self.sum_y2, self.cos, self.norm_ratio = packed[:4]
        n = len(self.layers)
        self.layer_err, self.layer_y2 = packed[6:6 + n], packed[6 + n:6 + 2 * n]
        self.tokens, self.sum_y = int(packed[4]), packed[6 + 2 * n:]
        self.linear_err = None if self.linear_err is None else packed[5]
        self.fires = (latent_reduce or reduce)(self.fires)
        return self

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        total_var = self.sum_y2 - self.sum_y.pow(2).sum() / n  # sum ||y - mean||^2
        density = self.fires.double() / n
        out = {
            "fvu": (self.err / total_var.clamp_min(1e-30)).item(),
            "l0": (self.fires.sum().double() / n).item(),
            "dead_frac": (self.fires == 0).double().mean().item(),
            "dense_frac": (density > DENSE_THRESHOLD).double().mean().item(),
            "cos": (self.cos / n).item(),
            "norm_ratio": (self.norm_ratio / n).item(),
            "eval_tokens": self.tokens,
        }
        out |= self._per_layer(n)
        if self.linear_err is not None:
            out["skip_fvu"] = (self.linear_err / total_var.clamp_min(1e-30)).item()
            out["skip_explained"] = 1.0 - out["skip_fvu"]
        return out

    def _per_layer(self, n: int) -> dict[str, float]:
        """A stacked output's FVU (each layer's own eval-set mean), L0 and dead fraction per layer."""
        out = {}
        if not self.layers:
            return out
        per_layer_mean = self.sum_y.view(len(self.layers), -1)
        fires = self.fires.view(len(self.layers), -1)
        for i, layer in enumerate(self.layers):
            var = self.layer_y2[i] - per_layer_mean[i].pow(2).sum() / n
            out[f"fvu.layer{layer}"] = (self.layer_err[i] / var.clamp_min(1e-30)).item()
            out[f"l0.layer{layer}"] = (fires[i].sum().double() / n).item()
            out[f"dead_frac.layer{layer}"] = (fires[i] == 0).double().mean().item()
        out["fvu_layer_mean"] = sum(out[f"fvu.layer{L}"] for L in self.layers) / len(self.layers)
        return out

    def log10_density(self) -> torch.Tensor:
        return torch.log10(self.fires.double() / max(self.tokens, 1) + 1e-10)


@contextmanager
def inference_saes(trainers: dict):
    """name -> the SAE in inference mode, entered once per SAE in a fixed order (see above)."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(tr.evaluating()) for name, tr in trainers.items()}


@torch.no_grad()
def reconstruction_metrics(trainers: dict, source_batches: Iterable[dict], n_tokens: int) -> dict[str, ReconstructionStats]:
    """trainers: name -> SAETrainer; batches: site -> [T, d] from the held-out split."""
    stats = {}
    for name, tr in trainers.items():
        sae = tr.sae
        stats[name] = ReconstructionStats(sae.n_latents, sae.d_out, tr.tokens_since_fired.device, sae.output_layers)
    seen = 0
    with inference_saes(trainers) as saes:
        for batch in source_batches:
            if seen >= n_tokens:
                break
            take = min(n_tokens - seen, next(iter(batch.values())).shape[0])
            seen += take
            for name, tr in trainers.items():
                sae = saes[name]
                x = sae.normalize_input(batch[tr.input_site][:take])
                y = sae.normalize_target(batch[tr.output_site][:take])
                out = sae(x)
                stats[name].add(y, out.x_hat, out.values, out.indices)
                if sae.has_skip:
                    stats[name].add_linear(y, sae.linear_part(x))
    return stats


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over all predicted positions."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def _kl_sum(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    p_log = F.log_softmax(clean_logits[:, :-1].float(), -1)
    q_log = F.log_softmax(logits[:, :-1].float(), -1)
    return (p_log.exp() * (p_log - q_log)).sum()


@torch.no_grad()
def splice_metrics(source, trainers: dict, n_tokens: int, reduce,
                   sets: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """delta CE, KL(clean||spliced) and CE recovered on held-out sequences of a source that
    `can_splice` (the LLM runs through its `logits`): for each SAE, and for each replacement
    set (name -> member SAE names, framework/replacement.py), all on the same tokens."""
    sets = sets or {}
    sums = {name: {"ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0} for name in [*trainers, *sets]}
    ce_clean, predicted, seen = 0.0, 0, 0
    with inference_saes(trainers) as saes:
        # a stacked site (CLT) and a set splice every layer at once: the replacement model
        replacements = {name: hooks.Replacement.of(tr.input_site, tr.output_site, saes[name].splice_predictor)
                        for name, tr in trainers.items()}
        replacements |= {name: set_replacement(members, trainers, saes) for name, members in sets.items()}
        for ids in source.sequences("eval"):
            if seen >= n_tokens:
                break
            seen += ids.numel()
            ids = ids.to(source.model_device)
            keep = source.sae_positions(ids)
            clean = source.logits(ids)
            ce_clean += _next_token_ce(clean, ids).item()
            predicted += ids[:, 1:].numel()
            for name, replacement in replacements.items():
                spliced = source.logits(ids, replacement, keep)
                zero = source.logits(ids, replacement.zero_ablation(), keep)
                sums[name]["ce_spliced"] += _next_token_ce(spliced, ids).item()
                sums[name]["ce_zero"] += _next_token_ce(zero, ids).item()
                sums[name]["kl"] += _kl_sum(clean, spliced).item()
    names = list(sums)
    packed = reduce(torch.tensor([ce_clean, predicted, seen] + [v for n in names for v in sums[n].values()],
                                 dtype=torch.float64, device=source.device))
    ce_clean, predicted, seen = packed[0].item(), int(packed[1]), int(packed[2])
    for i, n in enumerate(names):
        sums[n] = dict(zip(sums[n], packed[3 + 3 * i: 6 + 3 * i].tolist()))
    out = {}
    for name, s in sums.items():
        clean_ce = ce_clean / max(predicted, 1)
        spliced_ce, zero_ce = s["ce_spliced"] / max(predicted, 1), s["ce_zero"] / max(predicted, 1)
        out[name] = {
            "ce_clean": clean_ce,
            "ce_spliced": spliced_ce,
            "ce_zero_ablated": zero_ce,
            "delta_ce": spliced_ce - clean_ce,
            "kl": s["kl"] / max(predicted, 1),
            "ce_recovered": (zero_ce - spliced_ce) / (zero_ce - clean_ce) if zero_ce != clean_ce else float("nan"),
            "splice_tokens": seen,
        }
    return out


def evaluate(source, trainers: dict, eval_tokens: int, splice_tokens: int, splice: bool,
             reduce=lambda t: t, world: int = 1, llm_source=None, latent_reduce=None,
             sets: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """All metrics per SAE name, plus the raw stats (for density histograms), and each
    replacement set's splice metrics (`replacement_sets`: name -> members and metrics). When
    `world` ranks share the SAEs, each evaluates 1/world of the tokens on its own shard and
    `reduce` sums the statistics (per-latent counts with `latent_reduce`, default `reduce`).
    Splicing runs on `llm_source` (default: `source`) when it is an LLM."""
    sets = sets or {}
    llm_source = llm_source if llm_source is not None else source
    stats = reconstruction_metrics(trainers, source.batches("eval"), max(1, eval_tokens // world))
    for s in stats.values():
        s.reduce_(reduce, latent_reduce)
        if s.tokens == 0:  # never a perfect score on nothing
            raise DataError("evaluation saw no held-out tokens (every held-out row was empty, special, NaN/Inf or an "
                            "outlier); add data or lower data.norm_outlier_factor")
    results = {name: s.result() for name, s in stats.items()}
    set_results = {name: {"members": list(members)} for name, members in sets.items()}
    if splice and llm_source.can_splice and splice_tokens > 0:
        for name, metrics in splice_metrics(llm_source, trainers, max(1, splice_tokens // world), reduce, sets).items():
            (set_results if name in sets else results)[name].update(metrics)
    if splice and splice_tokens > 0:  # e.g. a vision encoder's final embedding
        for name, metrics in llm_source.downstream_metrics(trainers, max(1, splice_tokens // world), reduce).items():
            results[name].update(metrics)
    return {"metrics": results, "stats": stats, "replacement_sets": set_results}
