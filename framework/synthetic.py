"""Synthetic activations with a known ground truth, for tests and studies.

Each token is a sparse superposition of a known dictionary of unit-norm feature directions
in `d` dimensions, plus Gaussian noise and an optional constant offset:

    x_t = offset + sum_{f active in t} c_{t,f} * D[f] + noise_std * N(0, I_d)

What is controllable (see `SyntheticConfig`):
- firing frequencies: Zipf-Mandelbrot, p_f proportional to (rank + zipf_offset)^-zipf_exponent,
  scaled so that the expected number of active features per token (true L0, children
  included) is `mean_l0`, each capped at `max_freq`;
- magnitudes: |c| drawn from exponential / lognormal / halfnormal / constant, times a fixed
  per-feature scale (lognormal with sigma `feature_scale_spread`);
- signed (bidirectional) features: a `signed_fraction` of the features fire with a random
  sign (a TopK SAE needs two latents for each, an AbsTopK SAE one);
- hierarchy: `n_parents` root features each get `children_per_parent` child features whose
  directions have cosine `child_cos` with the parent's and that fire only on tokens where the
  parent fires (with probability `child_prob`; at most one child per token when
  `exclusive_children`): the setting where feature absorption happens;
- varying true L0 per token: `l0_spread` > 0 multiplies every root probability of a token by
  a lognormal factor of mean 1 (over-dispersed L0); `fixed_roots` > 0 instead fires exactly
  that many root features per token (sampled without replacement, weighted by p_f);
- everything is drawn from seeded `torch.Generator`s: the dictionary from `seed`, the token
  stream from `seed + 1` (or a generator the caller passes).

Feature layout: indices [0, n_roots) are the root features, in decreasing nominal frequency;
children follow, grouped by parent: child c of parent number j is feature
n_roots + j * children_per_parent + c. `parent_of[f]` is -1 for roots.

    gen = SyntheticActivations(SyntheticConfig(d=256, n_features=768, mean_l0=24))
    x, codes = gen.sample(4096)              # x [4096, 256], codes: sparse ground truth
    gen.dictionary                           # [768, 256] unit rows
    feature_recovery(sae.decoder_weight, gen.dictionary)
    gen.write_shards("acts/", n_tokens=1_000_000, shard_rows=65536)  # for data.source=activations
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

MAGNITUDES = ("exponential", "lognormal", "halfnormal", "constant")


@dataclass
class SyntheticConfig:
    d: int = 256  # activation width
    n_features: int = 768  # true features (roots + children)
    mean_l0: float = 24.0  # expected active features per token, children included
    zipf_exponent: float = 0.8  # p_f ~ (rank + zipf_offset)^-exponent; 0 = all equal
    zipf_offset: float = 1.0
    max_freq: float = 0.25  # cap on any feature's firing probability
    magnitude: str = "lognormal"  # exponential | lognormal | halfnormal | constant
    magnitude_mean: float = 1.0  # mean of |c| before the per-feature scale
    magnitude_sigma: float = 0.4  # lognormal: sigma of log|c|
    feature_scale_spread: float = 0.3  # per-feature lognormal scale (sigma); 0 = all 1
    signed_fraction: float = 0.0  # fraction of features firing with a random sign
    n_parents: int = 0  # hierarchical roots ...
    children_per_parent: int = 4  # ... each with this many children
    child_cos: float = 0.5  # cosine between a child's direction and its parent's
    child_prob: float = 0.5  # P(a child fires | parent fires) (exclusive: P(one child fires))
    exclusive_children: bool = True  # at most one child of a parent fires per token
    l0_spread: float = 0.0  # sigma of the per-token lognormal multiplier on root probabilities
    fixed_roots: int = 0  # >0: exactly this many root features fire per token
    noise_std: float = 0.0  # Gaussian noise per coordinate
    offset_norm: float = 0.0  # norm of a constant offset added to every token (a dense mean)
    orthogonal: bool = False  # orthonormal dictionary (needs n_features <= d; children excluded)
    seed: int = 0

    def __post_init__(self):
        if self.magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude: '{self.magnitude}' is not one of {MAGNITUDES}")
        if self.n_parents * self.children_per_parent >= self.n_features:
            raise ValueError("n_parents * children_per_parent must leave at least one root feature")
        if self.n_parents > self.n_features - self.n_parents * self.children_per_parent:
            raise ValueError("more parents than root features")
        if not 0 <= self.child_cos < 1:
            raise ValueError("child_cos must be in [0, 1)")
        if not 0 <= self.child_prob <= 1 or not 0 <= self.signed_fraction <= 1:
            raise ValueError("child_prob and signed_fraction must be in [0, 1]")
        if not 0 < self.max_freq <= 1:
            raise ValueError("max_freq must be in (0, 1]")
        if self.zipf_offset <= 0:
            raise ValueError("zipf_offset must be > 0")
        if self.fixed_roots > self.n_roots:
            raise ValueError(f"fixed_roots={self.fixed_roots} exceeds the {self.n_roots} root features")
        if self.fixed_roots and self.l0_spread:
            raise ValueError("fixed_roots and l0_spread are exclusive")
        if self.orthogonal and self.n_features - self.n_parents * self.children_per_parent > self.d:
            raise ValueError("orthogonal dictionary needs n_roots <= d")

    @property
    def n_children(self) -> int:
        return self.n_parents * self.children_per_parent

    @property
    def n_roots(self) -> int:
        return self.n_features - self.n_children


@dataclass
class SyntheticCodes:
    """The ground-truth sparse codes of a sample, as COO triples (one entry per active
    (token, feature) pair, ordered by token then feature)."""

    token: torch.Tensor  # [nnz] long
    feature: torch.Tensor  # [nnz] long
    coef: torch.Tensor  # [nnz] float, signed coefficient
    n_tokens: int
    n_features: int

    def l0(self) -> torch.Tensor:
        """[n_tokens] number of active features per token."""
        return torch.bincount(self.token, minlength=self.n_tokens)

    def firing_counts(self) -> torch.Tensor:
        """[n_features] number of tokens each feature fired on."""
        return torch.bincount(self.feature, minlength=self.n_features)

    def dense(self) -> torch.Tensor:
        """[n_tokens, n_features] dense codes (small samples only)."""
        out = torch.zeros(self.n_tokens, self.n_features, dtype=self.coef.dtype)
        out[self.token, self.feature] = self.coef
        return out

    def active(self) -> torch.Tensor:
        """[n_tokens, n_features] bool firing mask (small samples only)."""
        out = torch.zeros(self.n_tokens, self.n_features, dtype=torch.bool)
        out[self.token, self.feature] = True
        return out


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _zipf_probs(n_roots: int, cfg: SyntheticConfig, weight: torch.Tensor) -> torch.Tensor:
    """Root probabilities p = min(c * base, max_freq) with c chosen (bisection) so that
    sum(p * weight) = mean_l0, where weight counts the root itself plus its expected children."""
    ranks = torch.arange(n_roots, dtype=torch.float64)
    base = (ranks + cfg.zipf_offset).pow(-cfg.zipf_exponent)
    capacity = (weight * cfg.max_freq).sum().item()
    if cfg.mean_l0 > capacity * (1 - 1e-9):
        raise ValueError(f"mean_l0={cfg.mean_l0} is unreachable with max_freq={cfg.max_freq} "
                         f"(at most {capacity:.2f}); raise max_freq or n_features")
    lo, hi = 0.0, cfg.max_freq / base.min().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        if ((mid * base).clamp(max=cfg.max_freq) * weight).sum().item() < cfg.mean_l0:
            lo = mid
        else:
            hi = mid
    return ((lo + hi) / 2 * base).clamp(max=cfg.max_freq)


class SyntheticActivations:
    """A seeded generator of synthetic activations with known features (see the module doc)."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        R, P, m = cfg.n_roots, cfg.n_parents, cfg.children_per_parent
        # which roots are parents: a seeded random subset (not tied to frequency rank)
        self.parents = torch.randperm(R, generator=g)[:P].sort().values
        # directions
        if cfg.orthogonal:
            q, _ = torch.linalg.qr(torch.randn(cfg.d, cfg.d, generator=g, dtype=torch.float64))
            roots = q.T[:R].float()
        else:
            roots = _unit_rows(torch.randn(R, cfg.d, generator=g))
        children = []
        if P:
            par = roots[self.parents].repeat_interleave(m, 0)  # [P*m, d]
            u = torch.randn(P * m, cfg.d, generator=g)
            u = _unit_rows(u - (u * par).sum(1, keepdim=True) * par)  # orthogonal to the parent
            children.append(_unit_rows(cfg.child_cos * par + math.sqrt(1 - cfg.child_cos**2) * u))
        self.dictionary = torch.cat([roots] + children)  # [F, d], unit rows
        # structure
        self.parent_of = torch.full((cfg.n_features,), -1, dtype=torch.long)
        if P:
            self.parent_of[R:] = self.parents.repeat_interleave(m)
        children_expected = cfg.child_prob * (1 if cfg.exclusive_children else m)
        weight = torch.ones(R, dtype=torch.float64)
        weight[self.parents] += children_expected
        self.root_probs = _zipf_probs(R, cfg, weight)  # [R] float64
        child_marginal = cfg.child_prob / m if cfg.exclusive_children else cfg.child_prob
        # nominal marginal firing probability of every feature (exact without l0_spread's
        # clipping at 1 and without fixed_roots; approximate otherwise)
        self.frequencies = torch.cat([self.root_probs, self.root_probs[self.parents].repeat_interleave(m)
                                      * child_marginal]).float()
        self.signed = torch.rand(cfg.n_features, generator=g) < cfg.signed_fraction
        if cfg.feature_scale_spread > 0:
            s = cfg.feature_scale_spread
            self.feature_scale = torch.exp(s * torch.randn(cfg.n_features, generator=g) - s * s / 2)
        else:
            self.feature_scale = torch.ones(cfg.n_features)
        offset = torch.randn(cfg.d, generator=g)
        self.offset = offset / offset.norm() * cfg.offset_norm
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)

    # ------------------------------------------------------------------------- sampling
    def _magnitudes(self, n: int, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if cfg.magnitude == "exponential":
            return torch.empty(n).exponential_(1.0, generator=g) * cfg.magnitude_mean
        if cfg.magnitude == "lognormal":  # mean magnitude_mean
            s = cfg.magnitude_sigma
            return torch.exp(s * torch.randn(n, generator=g) - s * s / 2) * cfg.magnitude_mean
        if cfg.magnitude == "halfnormal":  # E|z| = sqrt(2/pi)
            return torch.randn(n, generator=g).abs() * (cfg.magnitude_mean / math.sqrt(2 / math.pi))
        return torch.full((n,), cfg.magnitude_mean)

    def _fire_mask(self, n: int, g: torch.Generator) -> torch.Tensor:
        """[n, F] bool: which features fire on each token."""
        cfg = self.cfg
        p = self.root_probs.float()
        if cfg.fixed_roots:
            picks = torch.multinomial(p.expand(n, -1), cfg.fixed_roots, replacement=False, generator=g)
            roots = torch.zeros(n, cfg.n_roots, dtype=torch.bool).scatter_(1, picks, True)
        else:
            probs = p.expand(n, -1)
            if cfg.l0_spread > 0:
                s = cfg.l0_spread
                mult = torch.exp(s * torch.randn(n, 1, generator=g) - s * s / 2)
                probs = (probs * mult).clamp(max=1.0)
            roots = torch.rand(n, cfg.n_roots, generator=g) < probs
        if not cfg.n_parents:
            return roots
        P, m = cfg.n_parents, cfg.children_per_parent
        parent_on = roots[:, self.parents].unsqueeze(2)  # [n, P, 1]
        if cfg.exclusive_children:
            which = torch.randint(m, (n, P), generator=g)
            on = torch.rand(n, P, generator=g) < cfg.child_prob
            kids = torch.nn.functional.one_hot(which, m).bool() & on.unsqueeze(2)
        else:
            kids = torch.rand(n, P, m, generator=g) < cfg.child_prob
        return torch.cat([roots, (kids & parent_on).flatten(1)], 1)

    @torch.no_grad()
    def sample(self, n_tokens: int, generator: torch.Generator | None = None, chunk: int = 16384,
               with_codes: bool = True) -> tuple[torch.Tensor, SyntheticCodes | None]:
        """(x [n_tokens, d] float32, ground-truth codes). Uses (and advances) `generator`,
        by default the instance's own stream. The draws depend on the sizes requested:
        sample(1000) twice is not the same tokens as sample(2000) once. with_codes=False
        returns (x, None) and keeps no codes (for large samples)."""
        g = generator if generator is not None else self.generator
        out = torch.empty(n_tokens, self.cfg.d)
        toks, feats, coefs = [], [], []
        for start in range(0, n_tokens, chunk):
            n = min(chunk, n_tokens - start)
            t, f = self._fire_mask(n, g).nonzero(as_tuple=True)
            c = self._magnitudes(t.numel(), g) * self.feature_scale[f]
            signs = torch.where(torch.rand(t.numel(), generator=g) < 0.5, -1.0, 1.0)
            c = torch.where(self.signed[f], c * signs, c)
            # one bag of (feature, coef) pairs per token; nonzero() is row-major, so bags are contiguous
            starts = torch.zeros(n, dtype=torch.long)
            starts[1:] = torch.bincount(t, minlength=n)[:-1].cumsum(0)
            x = torch.nn.functional.embedding_bag(f, self.dictionary, starts, mode="sum", per_sample_weights=c)
            if self.cfg.noise_std > 0:
                x += self.cfg.noise_std * torch.randn(n, self.cfg.d, generator=g)
            torch.add(x, self.offset, out=out[start:start + n])
            if with_codes:
                toks.append(t + start)
                feats.append(f)
                coefs.append(c)
        if not with_codes:
            return out, None
        if not toks:  # n_tokens == 0
            toks, feats, coefs = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0)]
        return out, SyntheticCodes(torch.cat(toks), torch.cat(feats), torch.cat(coefs), n_tokens, self.cfg.n_features)

    def batches(self, batch_size: int, n_tokens: int | None = None,
                generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Batches of x (without codes) from the stream, forever or until n_tokens."""
        done = 0
        while n_tokens is None or done < n_tokens:
            n = batch_size if n_tokens is None else min(batch_size, n_tokens - done)
            yield self.sample(n, generator, with_codes=False)[0]
            done += n

    # ------------------------------------------------------------------------- statistics
    def expected_l0(self) -> float:
        return float(self.frequencies.double().sum())

    def signal_energy(self) -> float:
        """E||sum_f c_f D[f]||^2 ignoring cross terms (directions are near-orthogonal)."""
        cfg = self.cfg
        if cfg.magnitude == "exponential":
            m2 = 2.0
        elif cfg.magnitude == "lognormal":
            m2 = math.exp(cfg.magnitude_sigma**2)
        elif cfg.magnitude == "halfnormal":
            m2 = math.pi / 2
        else:
            m2 = 1.0
        m2 *= cfg.magnitude_mean**2
        return float((self.frequencies * self.feature_scale.pow(2)).sum()) * m2

    def noise_fraction(self) -> float:
        """Approximate share of the variance (around the mean) that is noise: the FVU floor
        of a perfect dictionary reconstruction."""
        noise = self.cfg.noise_std**2 * self.cfg.d
        return noise / (noise + self.signal_energy())

    # ------------------------------------------------------------------------- files
    def write_shards(self, folder: str | Path, n_tokens: int, shard_rows: int = 65536,
                     key: str = "activations", dtype: torch.dtype = torch.float32,
                     generator: torch.Generator | None = None, save_ground_truth: bool = True) -> list[Path]:
        """Write `n_tokens` tokens as `shard_00000.safetensors`, ... (tensor `key`, [rows, d])
        readable by sparsemill's file source (data.source=activations, data.activations_dir).
        With save_ground_truth, `ground_truth/tensors.safetensors` (a subfolder: the file source
        ignores it) holds the dictionary, frequencies, parents, signed mask, scales and offset,
        and `synthetic_config.json` the config (`load_ground_truth` reads both back)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, start in enumerate(range(0, n_tokens, shard_rows)):
            x, _ = self.sample(min(shard_rows, n_tokens - start), generator, with_codes=False)
            path = folder / f"shard_{i:05d}.safetensors"
            save_file({key: x.to(dtype).contiguous()}, str(path))
            paths.append(path)
        if save_ground_truth:
            (folder / "ground_truth").mkdir(exist_ok=True)
            tensors = {k: v.contiguous() for k, v in self.ground_truth().items() if torch.is_tensor(v)}
            save_file(tensors, str(folder / "ground_truth" / "tensors.safetensors"))
            (folder / "synthetic_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        return paths

    def ground_truth(self) -> dict:
        return {"dictionary": self.dictionary, "frequencies": self.frequencies, "parent_of": self.parent_of,
                "signed": self.signed, "feature_scale": self.feature_scale, "offset": self.offset,
                "config": dataclasses.asdict(self.cfg)}


def load_ground_truth(folder: str | Path) -> dict:
    """What `write_shards(save_ground_truth=True)` wrote: the tensors and the config dict."""
    from safetensors.torch import load_file  # noqa: PLC0415

    folder = Path(folder)
    truth = load_file(str(folder / "ground_truth" / "tensors.safetensors"))
    return {**truth, "config": json.loads((folder / "synthetic_config.json").read_text())}


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def max_cosines(decoder_weight: torch.Tensor, dictionary: torch.Tensor, use_abs: bool = False,
                chunk: int = 8192) -> torch.Tensor:
    """[n_features]: for each true feature, the largest cosine with any decoder row (with
    use_abs, the largest |cosine|: right for AbsTopK latents, which may point either way)."""
    truth = _unit_rows(dictionary.detach().float().cpu())
    dec = _unit_rows(decoder_weight.detach().float().cpu())
    best = torch.full((truth.shape[0],), -1.0)
    for start in range(0, dec.shape[0], chunk):
        cos = truth @ dec[start:start + chunk].T
        if use_abs:
            cos = cos.abs()
        best = torch.maximum(best, cos.max(1).values)
    return best


def feature_recovery(decoder_weight: torch.Tensor, dictionary: torch.Tensor, threshold: float = 0.9,
                     use_abs: bool = False) -> tuple[float, float]:
    """(mean over true features of the max cosine with a decoder row, fraction of true
    features whose max cosine exceeds `threshold`). decoder_weight: [n_latents, d]
    (SAELens W_dec); dictionary: [n_features, d]."""
    best = max_cosines(decoder_weight, dictionary, use_abs)
    return best.mean().item(), (best > threshold).float().mean().item()
