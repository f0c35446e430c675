"""The SAE kinds side by side on synthetic activations with a known dictionary.

    python -m framework.benchmarks.variants_table            # full table, ~10-15 min on 2 CPU cores
    python -m framework.benchmarks.variants_table --quick    # smoke version, < 2 min (verdicts meaningless)
    python -m framework.benchmarks.variants_table --kinds topk,matryoshka --budget 300000

Every run trains through `framework.sae_trainer.SAETrainer` (the real step: normalised MSE +
AuxK + the kind's own loss terms, decoder-gradient projection, clipping, Adam with warmup and
decay, renorm, after_step) on the same token stream, initialised like `framework.train`
(normalisation + geometric-median b_dec from the first tokens), and is evaluated in eval mode
(inference selection: thresholds for batchtopk-style kinds, adaptive stopping for mpsae) on
held-out tokens whose ground truth is known.

Data (`table_data_config`, framework.synthetic): d=64, 256 true features of which 64 are
children of 16 parents (cos 0.5 to the parent, one child at a time, firing only with the parent),
20% bidirectional (random sign), Zipf frequencies, lognormal magnitudes, per-token L0 of mean 8
over-dispersed by a lognormal factor (sigma 0.6), small noise, a constant offset. 24 frequent
root features are "important but quiet": their magnitudes are scaled by 0.35 and a synthetic
downstream loss L(x) = 0.5 (x - offset)^T M (x - offset), M = 25 sum_{f in S} D_f D_f^T, weighs
them; its gradient M (x - offset) is what gsae receives (standing in for d(LM loss)/d(act)).

Columns:
  FVU      E||x - x_hat||^2 / E||x - mean||^2 on the held-out tokens (inference mode)
  L0       mean active latents per token (distinct latents: mpsae may pick one twice)
  dead     fraction of latents that never fired on the held-out tokens
  dead_tr  the trainer's counter: not fired within the last `dead_after` training tokens
  maxcos   mean over true features of the best decoder-row cosine (|cos| for abstopk)
  rec.9    fraction of true features with best cosine > 0.9
  sgn2     bidirectional features represented in BOTH directions (abstopk: one latent with
           |cos| > 0.9; other kinds need a latent at cos > 0.9 and another at cos < -0.9)
  lat/sgn  latents with |cos| > 0.9 per such feature (1 = one latent, 2 = a split pair)
  child / parent   rec.9 restricted to the hierarchical children / their parents
  L0corr   Pearson correlation over tokens between the active count and the true L0
  pFVU16 / pFVU4   FVU when only latents [0, n/16) / [0, n/4) of the selected ones are kept
  dFVU     downstream-weighted FVU: E[e^T M e] / E[(x - mean)^T M (x - mean)], e = x - x_hat
  imp      rec.9 of the 24 important-but-quiet features
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch

from framework import optim

import framework.kinds  # noqa: F401  (registers the kinds)
from framework.schema import SAEConfig, TrainConfig
from framework.sae_trainer import SAETrainer, total_steps_for
from framework.synthetic import SyntheticActivations, SyntheticConfig, max_cosines

EVAL_CHUNK = 4096


@dataclasses.dataclass
class Run:
    label: str
    kind: str
    options: dict = dataclasses.field(default_factory=dict)
    aux_coef: float = 1.0 / 32.0


RUNS = [
    Run("topk", "topk"),
    Run("abstopk", "abstopk"),
    Run("batchtopk", "batchtopk"),
    Run("mutual_choice", "mutual_choice"),
    Run("mutual_choice+zipf", "mutual_choice", {"aux_zipf_coef": 1 / 32}),
    Run("feature_choice", "feature_choice"),
    Run("feature_choice+zipf", "feature_choice", {"capacity": "zipf", "aux_zipf_coef": 1 / 32}),
    Run("topafa", "topafa"),
    Run("gsae", "gsae", {"beta": 2.0}),
    Run("mpsae", "mpsae"),
    Run("matryoshka", "matryoshka"),
    Run("matryoshka+batchtopk", "matryoshka", {"selection": "batchtopk"}),
    Run("vtopk", "vtopk"),
    Run("jumprelu", "jumprelu"),  # target L0 = k through the controller
    Run("jumprelu+tanh", "jumprelu", {"sparsity": "tanh"}),
    Run("jumprelu+ste", "jumprelu", {"ste_to_input": True}),
    Run("jumprelu+fast", "jumprelu", {"threshold_lr_scale": 5.0}),
]


def table_data_config(seed: int = 0) -> SyntheticConfig:
    return SyntheticConfig(d=64, n_features=256, mean_l0=8.0, zipf_exponent=0.6, max_freq=0.2,
                           magnitude="lognormal", magnitude_sigma=0.4, feature_scale_spread=0.2,
                           signed_fraction=0.2, n_parents=16, children_per_parent=4, child_cos=0.5,
                           child_prob=0.6, exclusive_children=True, l0_spread=0.6, noise_std=0.02,
                           offset_norm=2.0, seed=seed)


def important_features(gen: SyntheticActivations, n_important: int, seed: int) -> torch.Tensor:
    """Frequent non-parent roots (frequency rank in the top half), picked at random."""
    cfg = gen.cfg
    is_parent = torch.zeros(cfg.n_roots, dtype=torch.bool)
    is_parent[gen.parents] = True
    pool = torch.arange(cfg.n_roots // 2)
    pool = pool[~is_parent[pool]]
    pick = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed + 99))[:n_important]
    return pool[pick].sort().values


@torch.no_grad()
def evaluate_run(tr: SAETrainer, eval_x: torch.Tensor, true_l0: torch.Tensor, gen: SyntheticActivations,
                 metric: torch.Tensor, important: torch.Tensor) -> dict:
    n = tr.sae.n_latents
    prefixes = (max(1, n // 16), max(1, n // 4))
    err = torch.zeros((), dtype=torch.float64)
    derr = torch.zeros((), dtype=torch.float64)
    perr = torch.zeros(len(prefixes), dtype=torch.float64)
    fires = torch.zeros(n, dtype=torch.long)
    l0s = []
    with tr.evaluating() as sae:
        for start in range(0, eval_x.shape[0], EVAL_CHUNK):
            xr = eval_x[start:start + EVAL_CHUNK]
            x = sae.normalize_input(xr)
            out = sae(x)
            codes = torch.zeros(x.shape[0], n, dtype=out.values.dtype).scatter_add(1, out.indices, out.values)
            active = codes != 0
            fires += active.sum(0)
            l0s.append(active.sum(1))
            x_hat = out.x_hat / sae.output_scale
            e = (xr - x_hat).double()
            err += e.pow(2).sum()
            derr += ((e @ metric.double()) * e).sum()
            for i, m in enumerate(prefixes):
                xm = (codes[:, :m] @ sae.decoder_weight[:m] + sae.b_dec) / sae.output_scale
                perr[i] += (xr - xm).double().pow(2).sum()
    centred = (eval_x - eval_x.mean(0)).double()
    total = centred.pow(2).sum()
    dtotal = ((centred @ metric.double()) * centred).sum()
    l0 = torch.cat(l0s).double()
    tl0 = true_l0.double()
    corr = ((l0 - l0.mean()) * (tl0 - tl0.mean())).mean() / (l0.std(unbiased=False) * tl0.std(unbiased=False)).clamp_min(1e-12)
    sae = tr.sae
    use_abs = sae.use_abs
    best = max_cosines(sae.decoder_weight, gen.dictionary, use_abs=use_abs)
    cos = torch.nn.functional.normalize(gen.dictionary, dim=1) @ torch.nn.functional.normalize(
        sae.decoder_weight.detach(), dim=1).T  # [F, n]
    signed = gen.signed.nonzero().squeeze(1)
    pos = (cos[signed] > 0.9).sum(1)
    neg = (cos[signed] < -0.9).sum(1)
    both = (pos + neg > 0) if use_abs else (pos > 0) & (neg > 0)
    children = (gen.parent_of >= 0).nonzero().squeeze(1)
    return {
        "fvu": (err / total).item(),
        "l0": l0.mean().item(),
        "dead": (fires == 0).double().mean().item(),
        "dead_tr": tr.dead_mask().double().mean().item(),
        "maxcos": best.mean().item(),
        "rec": (best > 0.9).double().mean().item(),
        "sgn2": both.double().mean().item(),
        "lat_per_sgn": (pos + neg)[both].double().mean().item() if bool(both.any()) else float("nan"),
        "child": (best[children] > 0.9).double().mean().item(),
        "parent": (best[gen.parents] > 0.9).double().mean().item(),
        "l0corr": corr.item() if l0.std() > 0 else 0.0,
        "pfvu16": (perr[0] / total).item(),
        "pfvu4": (perr[1] / total).item(),
        "dfvu": (derr / dtotal).item(),
        "imp": (best[important] > 0.9).double().mean().item(),
    }


def run_one(run: Run, train_x: torch.Tensor, eval_x: torch.Tensor, true_l0: torch.Tensor, gen, metric, important,
            args, seed: int) -> dict:
    d = train_x.shape[1]
    sae_cfg = SAEConfig(name=run.label, kind=run.kind, n_latents=args.n_latents, k=args.k, options=dict(run.options),
                        aux_coef=run.aux_coef, dead_after_tokens=args.dead_after_tokens, lr=args.lr)
    train_cfg = TrainConfig(total_tokens=args.budget, batch_size=args.batch_size, init_tokens=args.init_tokens,
                            warmup_steps=args.warmup_steps, seed=seed)
    total_steps = total_steps_for(train_cfg)
    torch.manual_seed(seed)
    tr = SAETrainer(sae_cfg, train_cfg, "x", "x", {"x": d}, total_steps, torch.device("cpu"), seed=seed)
    init = train_x[:train_cfg.init_tokens]
    tr.init_from_sample(init, init, sae_cfg.normalize_activations, sae_cfg.b_dec_init)
    start = time.perf_counter()
    B = train_cfg.batch_size
    offset = gen.offset
    for step in range(total_steps):
        x = train_x[step * B:(step + 1) * B]
        if tr.sae.needs_lm_grad:
            tr.sae.set_grad((x - offset) @ metric)  # gradient of the synthetic downstream loss, raw units
        tr.step(x, x)
    seconds = time.perf_counter() - start
    result = evaluate_run(tr, eval_x, true_l0, gen, metric, important)
    return {"label": run.label, "kind": run.kind, "options": run.options, "aux_coef": run.aux_coef, "seed": seed,
            "seconds": seconds, "steps": total_steps, **result}


COLUMNS = [("FVU", "fvu", 6, 4), ("L0", "l0", 5, 1), ("dead", "dead", 5, 3), ("dead_tr", "dead_tr", 7, 3),
           ("maxcos", "maxcos", 6, 3), ("rec.9", "rec", 5, 3), ("sgn2", "sgn2", 5, 2), ("lat/sgn", "lat_per_sgn", 7, 2),
           ("child", "child", 5, 2), ("parent", "parent", 6, 2), ("L0corr", "l0corr", 6, 2),
           ("pFVU16", "pfvu16", 6, 3), ("pFVU4", "pfvu4", 6, 3), ("dFVU", "dfvu", 6, 4), ("imp", "imp", 5, 2),
           ("s", "seconds", 4, 0)]


def _mean(rows, key):
    vals = [r[key] for r in rows if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def aggregate(results: list[dict]) -> dict[str, dict]:
    labels = list(dict.fromkeys(r["label"] for r in results))
    return {lab: {key: _mean([r for r in results if r["label"] == lab], key) for _, key, _, _ in COLUMNS}
            for lab in labels}


def print_table(agg: dict[str, dict], out=sys.stdout) -> None:
    head = f"{'kind':<21}" + "".join(f" {name:>{w}}" for name, _, w, _ in COLUMNS)
    print(head, file=out)
    print("-" * len(head), file=out)
    for label, row in agg.items():
        print(f"{label:<21}" + "".join(f" {row[key]:>{w}.{p}f}" for _, key, w, p in COLUMNS), file=out)


def claims(agg: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(claim, evidence, verdict) for the claims the table can check."""
    out = []

    def have(*labels):
        return all(lab in agg for lab in labels)

    if have("topk", "abstopk"):
        t, a = agg["topk"], agg["abstopk"]
        ok = a["lat_per_sgn"] < 1.5 <= t["lat_per_sgn"] and a["sgn2"] >= t["sgn2"]
        out.append(("AbsTopK: one latent per bidirectional feature, TopK needs two",
                    f"both directions covered: abstopk {a['sgn2']:.2f} vs topk {t['sgn2']:.2f}; latents per such feature "
                    f"{a['lat_per_sgn']:.2f} vs {t['lat_per_sgn']:.2f}", "reproduced" if ok else "not reproduced"))
    for lab in ("mutual_choice", "mutual_choice+zipf", "feature_choice", "feature_choice+zipf"):
        if have("topk", lab):
            t, c = agg["topk"], agg[lab]
            fewer = c["dead"] < t["dead"] - 0.01
            fvu_ok = c["fvu"] <= t["fvu"] * 1.1
            verdict = "reproduced" if fewer and fvu_ok else ("fewer dead but worse FVU" if fewer else "not reproduced")
            out.append((f"{lab}: fewer dead latents than TopK at equal FVU",
                        f"dead {c['dead']:.3f} vs {t['dead']:.3f} (trainer {c['dead_tr']:.3f} vs {t['dead_tr']:.3f}); "
                        f"FVU {c['fvu']:.4f} vs {t['fvu']:.4f}; L0 {c['l0']:.1f} vs {t['l0']:.1f}", verdict))
    for lab in ("matryoshka", "matryoshka+batchtopk"):
        if have("topk", lab):
            t, m = agg["topk"], agg[lab]
            ok = m["pfvu16"] < 0.5 * t["pfvu16"] and m["pfvu4"] < 0.5 * t["pfvu4"]
            out.append((f"{lab}: small prefixes reconstruct far better than the same prefix of TopK",
                        f"FVU with latents [0,n/16): {m['pfvu16']:.3f} vs {t['pfvu16']:.3f}; [0,n/4): {m['pfvu4']:.3f} vs "
                        f"{t['pfvu4']:.3f}; full FVU {m['fvu']:.4f} vs {t['fvu']:.4f}", "reproduced" if ok else "not reproduced"))
    if have("topafa"):
        a = agg["topafa"]
        ref = "".join(f"; {lab} {agg[lab]['l0corr']:.2f}" for lab in ("topk", "batchtopk", "mpsae") if have(lab))
        out.append(("top-AFA tracks a varying true L0 without a k",
                    f"corr(active count, true L0) = {a['l0corr']:.2f} (others{ref}); L0 {a['l0']:.1f} "
                    f"(cap max_k = 4k), FVU {a['fvu']:.4f}, rec.9 {a['rec']:.2f}",
                    "reproduced" if a["l0corr"] > 0.5 else "not reproduced"))
    if have("topk", "mpsae"):
        t, m = agg["topk"], agg["mpsae"]
        ok = m["child"] > t["child"] + 0.05
        out.append(("MP-SAE recovers hierarchical features better than TopK",
                    f"children rec.9 {m['child']:.2f} vs {t['child']:.2f}; parents {m['parent']:.2f} vs {t['parent']:.2f}; "
                    f"all {m['rec']:.2f} vs {t['rec']:.2f}", "reproduced" if ok else "not reproduced"))
    if have("topk", "vtopk"):
        t, v = agg["topk"], agg["vtopk"]
        out.append(("vtopk dead-latent behaviour (vs TopK)",
                    f"dead {v['dead']:.3f} vs {t['dead']:.3f}, trainer {v['dead_tr']:.3f} vs {t['dead_tr']:.3f} "
                    f"(FVU {v['fvu']:.4f} vs {t['fvu']:.4f})",
                    "fewer dead" if v["dead"] < t["dead"] - 0.01 else ("more dead" if v["dead"] > t["dead"] + 0.01 else "about equal")))
    if have("topk", "gsae"):
        t, g = agg["topk"], agg["gsae"]
        out.append(("gsae (synthetic downstream loss): lower downstream error than TopK",
                    f"dFVU {g['dfvu']:.4f} vs {t['dfvu']:.4f}; important features rec.9 {g['imp']:.2f} vs {t['imp']:.2f}; "
                    f"FVU {g['fvu']:.4f} vs {t['fvu']:.4f}", "yes" if g["dfvu"] < t["dfvu"] else "no"))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke version (< 2 min)")
    parser.add_argument("--kinds", type=str, default="", help="comma-separated run labels (default: all)")
    parser.add_argument("--budget", type=int, default=None, help="training tokens per run")
    parser.add_argument("--n-latents", type=int, default=None)
    parser.add_argument("--lr", type=float, default=4e-3,
                        help="Adam lr (0 = the framework default optim.default_lr('adam', n), which may leave these "
                             "short runs far from converged)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--init-tokens", type=int, default=8192)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--dead-after-tokens", type=int, default=None)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first_seed .. first_seed + seeds - 1")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small matrices on a shared machine)")
    parser.add_argument("--json", type=str, default="")
    args = parser.parse_args(argv)
    q = args.quick
    args.n_latents = args.n_latents or (512 if q else 1024)
    args.budget = args.budget or (80_000 if q else 600_000)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (10 if q else 50)
    args.dead_after_tokens = args.dead_after_tokens or (10_000 if q else 50_000)
    args.eval_tokens = args.eval_tokens or (4096 if q else 16384)
    torch.set_num_threads(args.threads)
    runs = RUNS
    if args.kinds:
        wanted = [s.strip() for s in args.kinds.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {r.label for r in RUNS}]
        if unknown:
            parser.error(f"unknown run labels {unknown}; known: {[r.label for r in RUNS]}")
        runs = [r for r in RUNS if r.label in wanted]

    results = []
    t0 = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        gen = SyntheticActivations(table_data_config(seed))
        important = important_features(gen, 24, seed)
        gen.feature_scale[important] *= 0.35
        dirs = gen.dictionary[important]
        metric = 25.0 * dirs.T @ dirs
        train_x, _ = gen.sample(args.budget + args.batch_size)
        eval_x, codes = gen.sample(args.eval_tokens, torch.Generator().manual_seed(10_000 + seed))
        true_l0 = codes.l0()
        if seed == args.first_seed:
            c = gen.cfg
            print(f"data: d={c.d}, {c.n_features} true features ({c.n_children} children of {c.n_parents} parents, "
                  f"{int(gen.signed.sum())} bidirectional), E[L0]={gen.expected_l0():.1f} (eval: mean {true_l0.double().mean():.1f}, "
                  f"std {true_l0.double().std():.1f}), noise share ~{gen.noise_fraction():.3f}")
            print(f"SAEs: n_latents={args.n_latents}, k={args.k}, batch={args.batch_size}, {args.budget:,} tokens "
                  f"({math.ceil(args.budget / args.batch_size)} steps), Adam lr={args.lr or optim.default_lr('adam', args.n_latents):.2e}, "
                  f"AuxK (coef 1/32) on latents dead for {args.dead_after_tokens:,} tokens; eval on {args.eval_tokens:,} held-out tokens; threads={torch.get_num_threads()}", flush=True)
        for run in runs:
            r = run_one(run, train_x, eval_x, true_l0, gen, metric, important, args, seed)
            results.append(r)
            print(f"  seed={seed} {run.label:<21} FVU={r['fvu']:.4f} L0={r['l0']:.1f} dead={r['dead']:.3f} "
                  f"rec={r['rec']:.3f} ({r['seconds']:.0f}s)", flush=True)
    agg = aggregate(results)
    print()
    print_table(agg)
    print(f"\n(mean over {args.seeds} seed(s); total {time.perf_counter() - t0:.0f}s; columns: see the module docstring)")
    print("\nclaims:" + ("  (--quick: far too short to judge them; smoke run only)" if q else ""))
    for claim, evidence, verdict in claims(agg):
        print(f"  [{verdict}] {claim}\n      {evidence}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "table": agg}, fh, indent=2)
    return agg


if __name__ == "__main__":
    main()
