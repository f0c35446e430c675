"""The whole SAE training step as users run it, against its floor.

    python -m framework.benchmarks.train_step                      # topk, d=512, k=32, B=4096, n=16k and 64k
    python -m framework.benchmarks.train_step --data smollm2 --n 16384
    python -m framework.benchmarks.train_step --kind batchtopk --quick

Times `SAETrainer.step` (normalisation, TopK encode, sparse decode, loss, AuxK, firing
counters, gradient clipping, the optimizer, decoder renorm) at one thread, at torch's default
thread count, and oversubscribed (a second process running the same steps on the same
cores). The floor is one `x @ W_enc^T` of the same shape, timed between the steps (same
process, same cache and clock state), so a ratio is measured in one run. The breakdown is by
differences of nested calls: encode alone; the objective's forward (+ decode, loss, AuxK);
forward + backward; the whole step (+ optimizer, renorm, counters).

Data: `synthetic` (framework/synthetic.py's ground-truth generator at d) or `smollm2`
(SmolLM2-135M layer-6 residual activations of the Python docs: configs/smollm2_main.yaml;
d = 576). AuxK only runs when latents are dead; `--dead-frac` marks that share dead, as in a
long run (default 0.1).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import kernels
from kernels import cpu_ext
from framework import host_memory
from framework.benchmarks.smollm2_rows import smollm2_rows
from framework.schema import SAEConfig, TrainConfig
from framework.sae_trainer import SAETrainer
from framework.synthetic import SyntheticActivations, SyntheticConfig

ROWS = ("floor x@W.T", "encode", "+ decode, loss, AuxK", "+ backward", "step (+ optimizer, bookkeeping)")


def synthetic_rows(d: int, rows: int, seed: int = 0) -> torch.Tensor:
    gen = SyntheticActivations(SyntheticConfig(d=d, n_features=8 * d, noise_std=0.05, seed=seed))
    return gen.sample(rows, torch.Generator().manual_seed(seed + 1), with_codes=False)[0]


def make_trainer(kind: str, d: int, n: int, k: int, batch: int, sample: torch.Tensor) -> SAETrainer:
    sae_cfg = SAEConfig(name="sae", kind=kind, n_latents=n, k=k)
    train_cfg = TrainConfig(total_tokens=10**9, batch_size=batch)
    tr = SAETrainer(sae_cfg, train_cfg, "x", "x", {"x": d}, 10**6, torch.device("cpu"), seed=0)
    tr.init_from_sample(sample, sample)
    return tr


def phase_fns(tr: SAETrainer, x: torch.Tensor, k: int, dead_frac: float) -> dict:
    """One callable per nested phase of the step (ROWS order), on the same batch. The same
    latents are dead before every call (a step revives those that fire), as in a long run."""
    runner, sae = tr.runner, tr.sae
    w = sae.encoder_weight.detach()
    dead = torch.rand(tr.cfg.n_latents, generator=torch.Generator().manual_seed(2)) < dead_frac
    dead_ids = dead.nonzero().squeeze(1)

    def step():
        tr.tokens_since_fired.zero_()
        tr.tokens_since_fired[dead] = tr.cfg.dead_after_tokens
        tr.step(x, x)

    def encode():
        with torch.no_grad():
            kernels.topk_encode(sae.normalize_input(x), w, sae.encoder_bias.detach(), sae.input_offset().detach(), k)

    def forward():
        with torch.no_grad():
            runner(x, x, k, dead_ids, False, None)

    def backward():
        runner.optimizer.zero_grad(set_to_none=True)
        loss = runner(x, x, k, dead_ids, False, None)[0]
        runner.backward(loss)

    return {ROWS[0]: lambda: x @ w.T, ROWS[1]: encode, ROWS[2]: forward, ROWS[3]: backward,
            ROWS[4]: step}


def time_phases(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per phase over rounds that each run every phase once, interleaved."""
    for fn in fns.values():  # warm-up (allocations, tuned paths)
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def competitor(args, d: int, n: int) -> subprocess.Popen:
    """The same steps (on synthetic rows of the same width), repeated until killed, on the same cores."""
    cmd = [sys.executable, "-m", "framework.benchmarks.train_step", "--compete", "--kind", args.kind,
           "--d", str(d), "--n", str(n), "--k", str(args.k), "--batch", str(args.batch),
           "--dead-frac", str(args.dead_frac), *(["--malloc-default"] if args.malloc_default else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", "the competing process did not start"
    return proc


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="topk")
    ap.add_argument("--data", choices=["synthetic", "smollm2"], default="synthetic")
    ap.add_argument("--d", type=int, default=512, help="width (synthetic data; smollm2 is 576)")
    ap.add_argument("--n", type=int, nargs="+", help="latent counts (default 16384 65536; --quick: 4096)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dead-frac", type=float, default=0.1)
    ap.add_argument("--settings", default="1,default,oversubscribed",
                    help="comma list of: 1, default, oversubscribed (default threads + a competing process)")
    ap.add_argument("--quick", action="store_true", help="d=128, B=512, n=4096: a smoke run")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's malloc as it is (a training run keeps freed memory: framework/host_memory.py)")
    ap.add_argument("--compete", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    kept = False if args.malloc_default else host_memory.keep_freed_memory()  # as Engine does on CPU
    if args.quick:
        args.d, args.batch = 128, 512
    args.n = args.n or ([4096] if args.quick else [16384, 65536])
    rows = smollm2_rows(2 * args.batch) if args.data == "smollm2" else synthetic_rows(args.d, 2 * args.batch)
    d = rows.shape[1]
    x = rows[: args.batch].contiguous()
    if args.compete:
        step = phase_fns(make_trainer(args.kind, d, args.n[0], args.k, args.batch, rows), x, args.k,
                         args.dead_frac)[ROWS[4]]
        print("ready", flush=True)
        while True:
            step()
    default_threads = torch.get_num_threads()
    cpu_kernels = "C++ (kernels/cpu_topk.cpp, cpu_sparse.cpp)" if cpu_ext.load() is not None else "PyTorch"
    print(f"machine: {machine()}; default threads {default_threads}; freed memory kept: {kept}; "
          f"CPU selection and backward products: {cpu_kernels}")
    print(f"kind={args.kind} data={args.data} d={d} k={args.k} B={args.batch} dead={args.dead_frac:.0%}, "
          f"median of {args.rounds} interleaved rounds")
    results = []
    for n in args.n:
        for setting in args.settings.split(","):
            torch.set_num_threads(1 if setting == "1" else default_threads)
            tr = make_trainer(args.kind, d, n, args.k, args.batch, rows)
            other = competitor(args, d, n) if setting == "oversubscribed" else None
            try:
                times = time_phases(phase_fns(tr, x, args.k, args.dead_frac), args.rounds)
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            floor = times[ROWS[0]]
            results.append({"n": n, "setting": setting, "threads": torch.get_num_threads(), **times})
            print(f"\nn={n} {setting} ({torch.get_num_threads()} threads)")
            print(f"  {'phase':34s} {'ms':>9s} {'x floor':>8s}")
            for name in ROWS:
                print(f"  {name:34s} {times[name] * 1e3:9.1f} {times[name] / floor:8.2f}")
            print(f"  step tokens/s: {args.batch / times[ROWS[4]]:,.0f}")
    torch.set_num_threads(default_threads)
    return results


if __name__ == "__main__":
    main()
