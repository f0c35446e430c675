"""Circuit discovery with discrete per-head SAE codes, checked against activation patching.

The method ("Sparse Autoencoders Enable Scalable and Reliable Circuit Identification in
Language Models"): a few positive prompts (the model predicts the answer) and negative ones (it
cannot); one forward captures every attention head's output (`attn_z`, the concatenated heads
before the output projection, split per head) at the chosen layers; one small TopK SAE per head
is trained on them (all heads together, `HeadSAEs`); each token's code is discretised (its top-1
latent id, or its set of active latents) and a head scores the fraction of its positive codes
that never occur on negatives. Heads whose computation engages only when the task is solvable
score high; no ablation is run.

The ground truth it is compared with: activation patching of each head (its output at every
position replaced by the paired negative's, "resample", or by its mean over the negatives,
"mean"), scored by the drop of the answer-minus-distractor logit difference, as a fraction of
the clean one. The ground-truth circuit is the `ground_truth_heads` heads with the largest
|effect| on `patching.examples` pairs; the report gives precision/recall at the top N heads and
Spearman correlations, for the SAE method and for patching on the method's few examples, with
wall times of each.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from framework import hooks, templates
from framework.errors import ConfigError
from framework.schema import ModelConfig, check, check_choice
from framework.registry import Registry
from framework.study_config import write_outputs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config


@dataclass
class HeadSAEConfig:
    n_latents: int = 32  # latents per head's SAE
    k: int = 4  # active latents per token
    steps: int = 300  # full-batch Adam steps (all heads at once)
    lr: float = 3e-3
    seed: int = 0


@dataclass
class PatchingConfig:
    enabled: bool = True  # run the ground truth (and the few-example patching baseline)
    examples: int = 24  # pairs for the ground truth
    ablation: str = "resample"  # resample: the paired negative's head output | mean: its mean over negatives


@dataclass
class CircuitsConfig:
    run_dir: str = "runs/circuits"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(device="cpu"))
    task: str = ""  # task file (JSON, see framework/templates.py)
    layers: list[int] = field(default_factory=list)  # [] = every layer
    examples: int = 8  # positive and negative prompts each, for the SAE method
    positions: str = "all"  # tokens whose codes count: all (every non-BOS position) | last (the answer position)
    code: str = "active_set"  # discretisation, see CODES
    sae: HeadSAEConfig = field(default_factory=HeadSAEConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    ground_truth_heads: int = 10  # size of the patching circuit the ranking is scored against
    top_n: list[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 256  # prompts per LLM forward in patching (heads are patched in parallel copies)
    seed: int = 0

    def validate(self) -> None:
        check(bool(self.task), "task: give a task file (JSON with 'positive' and 'negative' examples)")
        check(self.examples >= 2, f"examples: must be >= 2 per side, got {self.examples}")
        check_choice(self.positions, POSITIONS, "positions")
        check_choice(self.code, CODES, "code")
        check_choice(self.patching.ablation, ABLATIONS, "patching.ablation")
        check(self.patching.examples >= 1, "patching.examples: must be >= 1")
        check(0 < self.sae.k <= self.sae.n_latents, f"sae.k: must be in [1, sae.n_latents={self.sae.n_latents}]")
        check(self.sae.steps >= 1 and self.sae.lr > 0, "sae.steps / sae.lr: must be > 0")
        check(self.ground_truth_heads >= 1, "ground_truth_heads: must be >= 1")
        check(bool(self.top_n) and all(n >= 1 for n in self.top_n), "top_n: a list of positive head counts")
        check(self.batch_size >= 1, "batch_size: must be >= 1")
        check(all(layer >= 0 for layer in self.layers), f"layers: must be >= 0, got {self.layers}")


POSITIONS = ("all", "last")


# --------------------------------------------------------------------------- head activations


@dataclass
class HeadActivations:
    """Per-head outputs of a prompt set: x [heads, tokens, d_head] (heads ordered layer-major),
    and each token's prompt index."""

    x: torch.Tensor
    prompt: torch.Tensor
    names: list[str]  # "L.H"


def n_heads_of(model: nn.Module) -> int:
    return int(model.config.num_attention_heads)


def _token_mask(batch: templates.PromptBatch, positions: str) -> torch.Tensor:
    if positions == "last":
        keep = torch.zeros_like(batch.mask, dtype=torch.bool)
        keep[torch.arange(len(batch.last)), batch.last] = True
        return keep
    keep = batch.mask.bool().clone()
    keep[:, 0] = False  # BOS
    return keep


@torch.no_grad()
def head_activations(model: nn.Module, batch: templates.PromptBatch, layers: list[int], positions: str) -> HeadActivations:
    """One forward (stopped after the last layer) capturing attn_z at every layer, split per head."""
    specs = [hooks.parse_site(f"blocks.{layer}.attn_z") for layer in layers]
    device = next(model.parameters()).device
    with hooks.capture(model, specs) as store:
        hooks.run_until_captured(lambda: model(input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device),
                                               use_cache=False))
    heads = n_heads_of(model)
    keep = _token_mask(batch, positions)
    xs, names = [], []
    for layer, spec in zip(layers, specs):
        z = store[spec.name].float().cpu()[keep]  # [tokens, heads * d_head]
        xs.append(z.view(z.shape[0], heads, -1).transpose(0, 1))
        names += [f"{layer}.{h}" for h in range(heads)]
    prompt = torch.arange(batch.ids.shape[0])[:, None].expand_as(keep)[keep]
    return HeadActivations(torch.cat(xs), prompt, names)


# --------------------------------------------------------------------------- per-head SAEs


SMALL_PROBLEM = 2**30  # heads x tokens x d_head x latents below which fit() runs single-threaded


class HeadSAEs(nn.Module):
    """G independent TopK SAEs, one per head, trained together by batched matmuls over the head
    axis: hundreds of 64-wide dictionaries on a few hundred tokens are far too small to train
    one by one. Same recipe as framework/sae.py at this scale: inputs scaled per head to
    E||x||^2 = d, b_dec at the mean, tied init, unit-norm decoder rows, full-batch Adam on each
    head's FVU (the heads' losses are summed: their gradients stay independent)."""

    def __init__(self, groups: int, d: int, n_latents: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dec = torch.randn(groups, n_latents, d, generator=g)
        dec /= dec.norm(dim=-1, keepdim=True)
        self.k = k
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(dec.transpose(1, 2).clone())
        self.b_enc = nn.Parameter(torch.zeros(groups, n_latents))
        self.b_dec = nn.Parameter(torch.zeros(groups, d))
        self.register_buffer("scale", torch.ones(groups))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [G, N, d] raw -> (values, latent ids) [G, N, k], values sorted descending."""
        xs = x * self.scale[:, None, None] - self.b_dec[:, None]
        pre = torch.baddbmm(self.b_enc[:, None], xs, self.W_enc)
        return pre.relu().topk(self.k, dim=-1)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        codes = values.new_zeros(*values.shape[:2], self.W_dec.shape[1]).scatter(-1, indices, values)
        return torch.bmm(codes, self.W_dec) + self.b_dec[:, None]  # normalised units

    def fvu(self, x: torch.Tensor) -> torch.Tensor:
        """Per head: ||y - y_hat||^2 / ||y - mean y||^2 in normalised units: [G]."""
        y = x * self.scale[:, None, None]
        y_hat = self.decode(*self.encode(x))
        return (y - y_hat).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)

    def fit(self, x: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        """Train on x [G, N, d]; returns the final per-head FVU. Problems below SMALL_PROBLEM run
        on one CPU thread: on loaded cores a threaded bmm waits ~1 ms per call for its threads
        (a tiny bmm measured 30x slower than single-threaded), and the SmolLM2 IOI fit (270 heads
        x 238 tokens) took 129 s on one thread vs 353 s on two."""
        threads = torch.get_num_threads()
        small = x.device.type == "cpu" and x.numel() * self.W_dec.shape[1] < SMALL_PROBLEM
        if small:
            torch.set_num_threads(1)
        try:
            return self._fit(x, steps, lr)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, x: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        with torch.no_grad():
            self.scale.copy_((x.shape[-1] / x.pow(2).sum(-1).mean(-1).clamp_min(1e-12)).sqrt())
            self.b_dec.copy_((x * self.scale[:, None, None]).mean(1))
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            self.fvu(x).sum().backward()
            with torch.no_grad():  # the radial part of each decoder row's gradient only changes its norm
                self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec
            opt.step()
            with torch.no_grad():
                self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            return self.fvu(x)


# --------------------------------------------------------------------------- codes and scores

CODES: Registry = Registry("code")


@CODES.register("top1")
def _top1(values: torch.Tensor, indices: torch.Tensor) -> list[list]:
    """A token's code: its most active latent (-1 when none fired)."""
    top = torch.where(values[..., 0] > 0, indices[..., 0], torch.full_like(indices[..., 0], -1))
    return top.tolist()


@CODES.register("active_set")
def _active_set(values: torch.Tensor, indices: torch.Tensor) -> list[list]:
    """A token's code: the set of its active latents."""
    ids = torch.where(values > 0, indices, torch.full_like(indices, -1)).sort(dim=-1).values
    return [[tuple(t) for t in head] for head in ids.tolist()]


def unique_code_scores(codes: list[list], is_positive: torch.Tensor) -> torch.Tensor:
    """Per head: |codes seen on positives but never on negatives| / |codes seen on positives|."""
    pos = is_positive.tolist()
    scores = []
    for head in codes:
        on_pos = {c for c, p in zip(head, pos) if p}
        on_neg = {c for c, p in zip(head, pos) if not p}
        scores.append(len(on_pos - on_neg) / max(len(on_pos), 1))
    return torch.tensor(scores, dtype=torch.float64)


# --------------------------------------------------------------------------- patching

ABLATIONS: Registry = Registry("ablation")


@ABLATIONS.register("resample")
def _resample(z_corrupt: torch.Tensor, corrupt: templates.PromptBatch) -> torch.Tensor:
    return z_corrupt


@ABLATIONS.register("mean")
def _mean(z_corrupt: torch.Tensor, corrupt: templates.PromptBatch) -> torch.Tensor:
    keep = corrupt.mask.bool().clone()
    keep[:, 0] = False
    return z_corrupt[keep.to(z_corrupt.device)].mean(0).expand_as(z_corrupt)


def _logits(model, batch: templates.PromptBatch, repeat: int = 1) -> torch.Tensor:
    """Final-position logits of the batch repeated `repeat` times: [repeat * n, vocab]."""
    return templates.final_logits(model, batch.ids.repeat(repeat, 1), batch.mask.repeat(repeat, 1),
                                  batch.last.repeat(repeat))


def _repeated(batch: templates.PromptBatch, repeat: int) -> templates.PromptBatch:
    return templates.PromptBatch(batch.ids.repeat(repeat, 1), batch.mask.repeat(repeat, 1), batch.last.repeat(repeat),
                                 batch.answer.repeat(repeat), batch.distractor.repeat(repeat))


@torch.no_grad()
def patching_effects(model: nn.Module, clean: templates.PromptBatch, corrupt: templates.PromptBatch, layers: list[int],
                     ablation: str = "resample", batch_size: int = 256) -> torch.Tensor:
    """Per head (layer-major), the drop of the mean logit difference when that head's output at
    every position is replaced (ABLATIONS), as a fraction of the clean mean: [layers * heads].
    Several heads are patched in one forward, each in its own copy of the prompts."""
    heads, n = n_heads_of(model), clean.ids.shape[0]
    ld_clean = clean.logit_diff(_logits(model, clean)).mean()
    if ld_clean <= 0:
        raise ConfigError(f"the model does not solve the task on these prompts (mean clean logit difference "
                          f"{ld_clean:.3f} <= 0): no effect to attribute")
    specs = [hooks.parse_site(f"blocks.{layer}.attn_z") for layer in layers]
    with hooks.capture(model, specs) as store:
        hooks.run_until_captured(lambda: _logits(model, corrupt))
    per_forward = max(1, min(heads, batch_size // max(n, 1)))
    effects = []
    for spec in specs:
        replacement = ABLATIONS[ablation](store[spec.name], corrupt)
        d_head = replacement.shape[-1] // heads
        for first in range(0, heads, per_forward):
            group = list(range(first, min(heads, first + per_forward)))

            def patch(act, group=group, replacement=replacement):
                act = act.clone()
                for j, h in enumerate(group):
                    cols = slice(h * d_head, (h + 1) * d_head)
                    act[j * n:(j + 1) * n, :, cols] = replacement[:, :, cols].to(act.dtype)
                return act

            with hooks.splice(model, spec, patch):
                logits = _logits(model, clean, repeat=len(group))
            ld = _repeated(clean, len(group)).logit_diff(logits).view(len(group), n).mean(1)
            effects += ((ld_clean - ld) / ld_clean).tolist()
    return torch.tensor(effects, dtype=torch.float64)


# --------------------------------------------------------------------------- ranking metrics


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    x = x.double()
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")


def top_heads(scores: torch.Tensor, n: int) -> set[int]:
    """The n highest scores; ties broken by head order (stable), never by float noise."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return set(order[:n])


def precision_recall(scores: torch.Tensor, truth: set[int], n: int) -> dict[str, float]:
    hits = len(top_heads(scores, n) & truth)
    return {"precision": hits / n, "recall": hits / max(len(truth), 1)}


def recovery(scores: torch.Tensor, truth_effects: torch.Tensor, truth: set[int], top_n: list[int]) -> dict:
    return {"spearman_vs_abs_effect": spearman(scores, truth_effects.abs()),
            **{f"top{n}": precision_recall(scores, truth, n) for n in top_n}}


# --------------------------------------------------------------------------- the command


def _solved_pairs(model, task: templates.Task, tokenizer, needed: int) -> tuple[list[int], float]:
    """Indices of the first `needed` pairs whose positive the model gets right (logit diff > 0),
    and the fraction of all positives it gets right."""
    batch = templates.encode(task.positive, tokenizer, "positive")
    with torch.no_grad():
        ld = batch.logit_diff(_logits(model, batch))
    good = [i for i in range(len(ld)) if ld[i] > 0]
    return good[:needed], len(good) / len(ld)


def run_circuits(cfg: CircuitsConfig) -> dict:
    from framework.llm import load_frozen  # noqa: PLC0415

    task = templates.load_task(cfg.task)
    t0 = time.perf_counter()
    model, tokenizer = load_frozen(cfg.model, seed=cfg.seed)
    load_s = time.perf_counter() - t0
    templates.check_pairs(task, tokenizer)
    n_layers = hooks.num_layers(model)
    layers = cfg.layers or list(range(n_layers))
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise ConfigError(f"layers: {bad} out of range, the model has {n_layers} layers")
    needed = max(cfg.examples, cfg.patching.examples if cfg.patching.enabled else 0)
    if len(task.positive) < cfg.examples:
        raise ConfigError(f"examples={cfg.examples}: task '{task.name}' has only {len(task.positive)} pairs")

    # the SAE method: select solved positives, one capture forward, per-head SAEs, codes, scores
    t_method = time.perf_counter()
    chosen, accuracy = _solved_pairs(model, task, tokenizer, needed)
    if len(chosen) < cfg.examples:
        raise ConfigError(f"task '{task.name}': the model solves only {len(chosen)} positive prompts, fewer than "
                          f"examples={cfg.examples}")
    few = chosen[: cfg.examples]
    prompts = [task.positive[i] for i in few] + [task.negative[i] for i in few]
    batch = templates.encode(prompts, tokenizer, "examples")
    t = time.perf_counter()
    acts = head_activations(model, batch, layers, cfg.positions)
    forward_s = time.perf_counter() - t
    t = time.perf_counter()
    saes = HeadSAEs(acts.x.shape[0], acts.x.shape[-1], cfg.sae.n_latents, cfg.sae.k, cfg.sae.seed)
    fvu = saes.fit(acts.x, cfg.sae.steps, cfg.sae.lr)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        values, indices = saes.encode(acts.x)
    scores = unique_code_scores(CODES[cfg.code](values, indices), acts.prompt < len(few))
    method_s = time.perf_counter() - t_method

    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    result = {
        "task": task.name, "model": cfg.model.name, "layers": layers, "heads_per_layer": n_heads_of(model),
        "examples_per_side": cfg.examples, "positions": cfg.positions, "code": cfg.code,
        "model_accuracy_on_positives": accuracy,
        "sae_fvu_mean": float(fvu.mean()), "sae_tokens_per_head": int(acts.x.shape[1]),
        "timing_s": {"load_model": round(load_s, 3), "sae_method": round(method_s, 3),
                     "sae_method_forward": round(forward_s, 3), "sae_method_train": round(train_s, 3)},
        "ranking": [{"head": acts.names[i], "score": float(scores[i]), "rank": r + 1} for r, i in enumerate(order)],
    }
    if cfg.patching.enabled:
        result.update(_validate_against_patching(cfg, model, tokenizer, task, chosen, few, layers, scores, acts.names))
        effects = {row["head"]: row for row in result.pop("_effects")}
        for row in result["ranking"]:
            row["patching_effect"] = effects[row["head"]]["effect"]
    write_outputs(cfg, result, "ranking.json")
    return result


def _validate_against_patching(cfg, model, tokenizer, task, chosen, few, layers, scores, names) -> dict:
    def effects_on(pairs):
        clean = templates.encode([task.positive[i] for i in pairs], tokenizer, "positive")
        corrupt = templates.encode([task.negative[i] for i in pairs], tokenizer, "negative")
        t = time.perf_counter()
        eff = patching_effects(model, clean, corrupt, layers, cfg.patching.ablation, cfg.batch_size)
        return eff, time.perf_counter() - t

    truth_pairs = chosen[: cfg.patching.examples]
    truth_effects, truth_s = effects_on(truth_pairs)
    # the same pairs (patching.examples <= examples): the baseline is the ground truth itself
    few_effects, few_s = (truth_effects, truth_s) if truth_pairs == few else effects_on(few)
    truth = top_heads(truth_effects.abs(), cfg.ground_truth_heads)
    n_heads = len(names)
    return {
        "ground_truth": {"ablation": cfg.patching.ablation, "pairs": len(truth_pairs), "heads": cfg.ground_truth_heads,
                         "circuit": [names[i] for i in sorted(truth, key=lambda i: -abs(float(truth_effects[i])))]},
        "recovery": {
            "sae_codes": recovery(scores, truth_effects, truth, cfg.top_n),
            "patching_same_examples": recovery(few_effects.abs(), truth_effects, truth, cfg.top_n),
            "random_expected_precision": cfg.ground_truth_heads / n_heads,
        },
        "timing_patching_s": {"same_examples": round(few_s, 3), "ground_truth": round(truth_s, 3)},
        "_effects": [{"head": names[i], "effect": float(truth_effects[i])} for i in range(n_heads)],
    }


def format_result(result: dict) -> str:
    t = result["timing_s"]
    lines = [f"task {result['task']}: {len(result['ranking'])} heads, {result['examples_per_side']} examples per side, "
             f"SAE method {t['sae_method']:.2f} s (forward {t['sae_method_forward']:.2f} s, train "
             f"{t['sae_method_train']:.2f} s)",
             "top heads: " + ", ".join(f"{r['head']} ({r['score']:.2f})" for r in result["ranking"][:10])]
    if "recovery" in result:
        tp = result["timing_patching_s"]
        lines.append(f"patching: same examples {tp['same_examples']:.2f} s, ground truth "
                     f"({result['ground_truth']['pairs']} pairs) {tp['ground_truth']:.2f} s; ground-truth circuit "
                     + ", ".join(result["ground_truth"]["circuit"]))
        for method, rec in result["recovery"].items():
            if not isinstance(rec, dict):
                continue
            cells = "  ".join(f"P/R@{k[3:]}={v['precision']:.2f}/{v['recall']:.2f}" for k, v in rec.items()
                              if k.startswith("top"))
            lines.append(f"  {method:24s} spearman={rec['spearman_vs_abs_effect']:+.3f}  {cells}")
        lines.append(f"  random: expected precision {result['recovery']['random_expected_precision']:.3f}")
    return "\n".join(lines)
