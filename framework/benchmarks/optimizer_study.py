"""Sample efficiency of the SAE optimizers on synthetic activations with a known dictionary,
and on real ones (`--data smollm2`).

    python -m framework.benchmarks.optimizer_study            # full study, ~15 min on 2 CPU cores
    python -m framework.benchmarks.optimizer_study --quick    # smoke version, < 1 min
    python -m framework.benchmarks.optimizer_study --data smollm2 --budgets 335872 \\
        --adam-lrs 2e-3 --sf-lrs 5e-3 --fvu-marks 0.3,0.15,0.1   # the real-activation row
    python -m framework.benchmarks.optimizer_study --n-latents 16384 --budgets 300000 \\
        --adam-lrs 5e-4,1e-3,2e-3 --sf-lrs 2e-3,5e-3      # e.g. check the width scaling rule

Sample efficiency = FVU on held-out tokens after a fixed token budget (default 300k and 1M), and
the headline that combines it with speed: training wall-clock seconds (and tokens) until the
held-out FVU first reaches each of `--fvu-marks` (checked every `--mark-every` steps on the first
`--mark-tokens` held-out tokens, the clock stopped meanwhile); every (optimizer, lr,
budget) is its own run, so Adam's warmup + linear decay is fitted to the budget. Learning
rates are given at 2^14 latents, in the units of `framework.optim.DEFAULT_LR`, and scaled to
the SAE's width by the framework's own rule (`optim.default_lr`); the table shows both.

Every run uses the framework's real step: `SAETrainer` (normalised MSE + AuxK, decoder-grad
projection, clipping, the optimizer registry, renorm), `init_from_sample` (normalisation and
geometric-median b_dec on the first `init_tokens` of the stream, which are then trained on,
as in `framework.train`) and `evaluate.reconstruction_metrics` (FVU with the eval-set mean,
dead fraction = never fired on the eval tokens, schedule-free evaluated at its averaged point).
All runs of one seed see the same token stream and the same held-out tokens.

The data (defaults, `study_data_config`): d=256, 768 true features (3x d), of which 640 roots (Zipf exponent 0.8, capped at 0.25) and 32 parents with 4 mutually
exclusive children each (cos 0.5 to the parent), 10% bidirectional features, lognormal
magnitudes with per-feature scales, per-token L0 over-dispersed (mean 24, lognormal
multiplier sigma 0.5), noise ~2% of the variance, a constant offset. The SAE: TopK,
n_latents=4096, k=32, AuxK on latents dead for 50k tokens (the default 10M would never trigger
within these budgets; 50k is ~2.5% of the long budget, like 10M of a few-hundred-M-token run).
n_latents (4096) exceeds the true feature count (768), so some dead latents are expected.

Measured results (and the defaults chosen from them) are in the comment above
`framework.optim.DEFAULT_LR`; they used budgets 300k and 2M, which took 1310 s on an idle 2-core
machine (45 ms per step at first, more once many latents are dead and AuxK has work), so the
default long budget is 1M (~12 minutes for the grid); --quick takes ~30 s.
On a shared machine pass --threads 1 (the FVU numbers do not depend on it: runs are seeded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time

import torch

from framework import host_memory, optim
from framework.benchmarks.smollm2_rows import smollm2_rows
from framework.schema import SAEConfig, TrainConfig
from framework.evaluate import reconstruction_metrics
from framework.sae_trainer import SAETrainer, total_steps_for
from framework.synthetic import SyntheticActivations, SyntheticConfig, feature_recovery

ADAM_LRS = [2e-4, 5e-4, 1e-3, 2e-3, 4e-3]
SF_LRS = [1e-3, 2e-3, 5e-3, 1e-2]
BUDGETS = [300_000, 1_000_000]  # the recorded table also used 2M: --budgets 300000,2000000 (~22 min)


def study_data_config(d: int = 256, seed: int = 0) -> SyntheticConfig:
    return SyntheticConfig(d=d, n_features=3 * d, mean_l0=24.0 * d / 256 if d < 256 else 24.0,
                           zipf_exponent=0.8, max_freq=0.25, magnitude="lognormal", magnitude_sigma=0.4,
                           feature_scale_spread=0.3, signed_fraction=0.1, n_parents=d // 8,
                           children_per_parent=4, child_cos=0.5, child_prob=0.5, exclusive_children=True,
                           l0_spread=0.5, noise_std=0.05, offset_norm=4.0, seed=seed)


@dataclasses.dataclass
class RunSpec:
    optimizer: str
    base_lr: float  # at 2^14 latents (DEFAULT_LR units)
    budget: int  # training tokens


def run_one(spec: RunSpec, train_x: torch.Tensor, eval_x: torch.Tensor, dictionary: torch.Tensor | None,
            args, seed: int) -> dict:
    n_latents = args.n_latents
    lr = spec.base_lr * optim.default_lr(spec.optimizer, n_latents) / optim.DEFAULT_LR[spec.optimizer]
    sae_cfg = SAEConfig(name="sae", kind="topk", n_latents=n_latents, k=args.k, lr=lr,
                        dead_after_tokens=args.dead_after_tokens)
    train_cfg = TrainConfig(total_tokens=spec.budget, batch_size=args.batch_size, optimizer=spec.optimizer,
                            init_tokens=args.init_tokens, seed=seed)
    total_steps = total_steps_for(train_cfg)
    d = train_x.shape[1]
    torch.manual_seed(seed)
    tr = SAETrainer(sae_cfg, train_cfg, "x", "x", {"x": d}, total_steps, torch.device("cpu"), seed=seed)
    init = train_x[:train_cfg.init_tokens]
    tr.init_from_sample(init, init, sae_cfg.normalize_activations, sae_cfg.b_dec_init)
    reached: dict[float, tuple[float, int]] = {}  # FVU mark -> (training seconds, tokens) when first reached
    seconds, diverged = 0.0, False
    B = train_cfg.batch_size
    for step in range(total_steps):
        x = train_x[step * B:(step + 1) * B]
        start = time.perf_counter()
        m = tr.step(x, x)
        if step % 50 == 0 and not math.isfinite(m.loss.item()):
            diverged = True
            break
        seconds += time.perf_counter() - start  # the clock stops while the marks are checked
        if len(reached) < len(args.fvu_marks) and (step + 1) % args.mark_every == 0:
            fvu_now = reconstruction_metrics({"sae": tr}, [{"x": eval_x[:args.mark_tokens]}],
                                             args.mark_tokens)["sae"].result()["fvu"]
            for mark in args.fvu_marks:
                if mark not in reached and fvu_now <= mark:
                    reached[mark] = (seconds, (step + 1) * B)
    train_sums = tr.read_sums()  # includes the trainer's own dead fraction (dead_after_tokens)
    stats = reconstruction_metrics({"sae": tr}, [{"x": eval_x}], eval_x.shape[0])["sae"].result()
    mean_cos = recovered = float("nan")  # real activations: no known dictionary to recover
    if dictionary is not None:
        with tr.evaluating() as sae:  # schedule-free: its averaged weights, as evaluation and export use
            mean_cos, recovered = feature_recovery(sae.decoder_weight, dictionary)
    fvu = stats["fvu"] if math.isfinite(stats["fvu"]) and not diverged else float("nan")
    return {**dataclasses.asdict(spec), "lr": lr, "n_latents": n_latents, "seed": seed, "fvu": fvu,
            "dead_frac": stats["dead_frac"], "dead_frac_train": train_sums["dead_frac"],
            "dense_frac": stats["dense_frac"], "l0": stats["l0"], "mean_max_cos": mean_cos,
            "recovered_0.9": recovered, "seconds": seconds, "steps": total_steps, "diverged": diverged,
            "time_to_fvu": {str(mark): reached.get(mark, (None, None))[0] for mark in args.fvu_marks},
            "tokens_to_fvu": {str(mark): reached.get(mark, (None, None))[1] for mark in args.fvu_marks}}


def _fmt(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f}±{statistics.stdev(values):.{digits}f}"


def print_table(results: list[dict], out=None) -> None:
    out = out or sys.stdout  # looked up now: a replaced sys.stdout (e.g. captured) is honoured
    keys = sorted({(r["budget"], r["optimizer"], r["base_lr"]) for r in results},
                  key=lambda t: (t[0], t[1], t[2]))
    header = (f"{'budget':>9} {'optimizer':<21} {'lr@2^14':>8} {'lr':>9} {'FVU':>15} {'dead':>6} "
              f"{'dead_tr':>7} {'maxcos':>7} {'rec.9':>6} {'s':>5}"
              + "".join(f" {'t(FVU<=' + mark + ')':>13}" for mark in results[0]["time_to_fvu"]))
    print(header, file=out)
    print("-" * len(header), file=out)
    best = {}
    for budget in {k[0] for k in keys}:
        rows = [r for r in results if r["budget"] == budget and math.isfinite(r["fvu"])]
        if rows:
            best[budget] = min(rows, key=lambda r: r["fvu"])["fvu"]
    for budget, opt_name, base_lr in keys:
        rows = [r for r in results if (r["budget"], r["optimizer"], r["base_lr"]) == (budget, opt_name, base_lr)]
        fvus = [r["fvu"] for r in rows]
        mark = " *" if budget in best and min(fvus) == best[budget] else ""
        print(f"{budget:>9,} {opt_name:<21} {base_lr:>8.0e} {rows[0]['lr']:>9.2e} {_fmt(fvus):>15} "
              f"{_fmt([r['dead_frac'] for r in rows], 3):>6} {_fmt([r['dead_frac_train'] for r in rows], 3):>7} "
              f"{_fmt([r['mean_max_cos'] for r in rows], 3):>7} {_fmt([r['recovered_0.9'] for r in rows], 3):>6} "
              f"{sum(r['seconds'] for r in rows):>5.0f}"
              + "".join(f" {_mark_time([r['time_to_fvu'][m] for r in rows]):>13}" for m in rows[0]["time_to_fvu"])
              + mark, file=out)


def _mark_time(seconds: list[float | None]) -> str:
    """Training seconds to an FVU mark (mean over seeds); '-' if a seed never reached it."""
    return "-" if None in seconds else f"{statistics.mean(seconds):.1f}s"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke version (< 1 min)")
    parser.add_argument("--data", choices=["synthetic", "smollm2"], default="synthetic",
                        help="smollm2: SmolLM2-135M layer-6 activations of the Python docs (d=576; held-out "
                        "documents for evaluation; no known features, so no maxcos / rec.9)")
    parser.add_argument("--d", type=int, default=None)
    parser.add_argument("--n-latents", type=int, default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--budgets", type=str, default=None, help="comma-separated token budgets")
    parser.add_argument("--adam-lrs", type=str, default=None, help="comma-separated, at 2^14 latents")
    parser.add_argument("--sf-lrs", type=str, default=None, help="signsgd_schedulefree lrs, at 2^14 latents")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds (data and SAE)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--init-tokens", type=int, default=8192)
    parser.add_argument("--dead-after-tokens", type=int, default=None)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); use 1 "
                        "on a machine shared with other jobs: spinning OpenMP threads slow tiny SAEs 10x")
    parser.add_argument("--fvu-marks", type=str, default="0.5,0.3",
                        help="report the training wall-clock time (and tokens) until held-out FVU first reaches each")
    parser.add_argument("--mark-every", type=int, default=16, help="steps between checks of the FVU marks")
    parser.add_argument("--mark-tokens", type=int, default=4096, help="held-out tokens per check (the first ones)")
    parser.add_argument("--json", type=str, default="", help="also write the results here")
    args = parser.parse_args(argv)
    q = args.quick
    args.d = args.d or (64 if q else 256)
    args.n_latents = args.n_latents or (1024 if q else 4096)
    args.k = args.k or (16 if q else 32)
    budgets = [int(b) for b in _floats(args.budgets)] if args.budgets else ([40_000, 150_000] if q else BUDGETS)
    adam_lrs = _floats(args.adam_lrs) if args.adam_lrs is not None else ADAM_LRS
    sf_lrs = _floats(args.sf_lrs) if args.sf_lrs is not None else SF_LRS
    args.dead_after_tokens = args.dead_after_tokens or (10_000 if q else 50_000)
    args.eval_tokens = args.eval_tokens or (8192 if q else 32768)
    args.fvu_marks = _floats(args.fvu_marks) if args.fvu_marks else []
    if args.threads:
        torch.set_num_threads(args.threads)
    host_memory.keep_freed_memory()  # as a training run's engine does on CPU

    specs = [RunSpec("adam", lr, b) for b in budgets for lr in adam_lrs]
    specs += [RunSpec("signsgd_schedulefree", lr, b) for b in budgets for lr in sf_lrs]
    results = []
    t0 = time.perf_counter()
    if args.data == "smollm2":  # one token stream for every seed (the seeds vary the SAE)
        real_train = smollm2_rows(max(budgets) + args.batch_size, "train")
        # shuffled, as a run's mixing buffer does: consecutive rows come from the same documents
        real_train = real_train[torch.randperm(real_train.shape[0], generator=torch.Generator().manual_seed(0))]
        real_eval = smollm2_rows(args.eval_tokens, "eval")
        print(f"data: SmolLM2-135M blocks.6.resid_post on the Python docs, d={real_train.shape[1]}, "
              f"{real_train.shape[0]:,} training and {real_eval.shape[0]:,} held-out tokens")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if args.data == "smollm2":
            train_x, eval_x, dictionary = real_train, real_eval, None
        else:
            data_cfg = study_data_config(args.d, seed=seed)
            gen = SyntheticActivations(data_cfg)
            train_x, _ = gen.sample(max(budgets) + args.batch_size, with_codes=False)
            eval_x, _ = gen.sample(args.eval_tokens, torch.Generator().manual_seed(10_000 + seed), with_codes=False)
            dictionary = gen.dictionary
            if seed == args.first_seed:
                print(f"data: d={data_cfg.d} true features={data_cfg.n_features} "
                      f"(roots={data_cfg.n_roots}, children={data_cfg.n_children}) E[L0]={gen.expected_l0():.1f} "
                      f"freq {gen.frequencies.min():.4f}..{gen.frequencies.max():.2f} "
                      f"noise share of variance~{gen.noise_fraction():.3f} (FVU floor)")
        if seed == args.first_seed:
            print(f"SAE: topk n_latents={args.n_latents} k={args.k} batch={args.batch_size} "
                  f"dead_after={args.dead_after_tokens:,} tokens; adam: warmup {TrainConfig.warmup_steps} steps, "
                  f"linear decay over the last {TrainConfig.decay_fraction:.0%}; eval tokens={args.eval_tokens:,}; "
                  f"seeds={args.seeds}; threads={torch.get_num_threads()}", flush=True)
        for spec in specs:
            r = run_one(spec, train_x, eval_x, dictionary, args, seed)
            results.append(r)
            print(f"  seed={seed} budget={spec.budget:,} {spec.optimizer} lr@2^14={spec.base_lr:g}: "
                  f"FVU={r['fvu']:.4f} dead={r['dead_frac']:.3f} maxcos={r['mean_max_cos']:.3f} "
                  f"rec={r['recovered_0.9']:.3f} ({r['seconds']:.0f}s; to FVU marks: {r['time_to_fvu']})", flush=True)
        del train_x
    print()
    print_table(results)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s   (* = lowest FVU at that budget; dead = never fired on the "
          f"eval tokens; dead_tr = the trainer's counter; maxcos = mean over true features of the best decoder "
          f"cosine; rec.9 = fraction with cosine > 0.9)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
