"""Time of one SAE training step against its floor: one dense X @ W_enc^T of the same shape.

The sparse step (TopK encode + sparse decode + backward of both) does one B x n x d matmul
plus O(B*k*d) work, so its time over one matmul's is the figure of merit (target <= 1.3).
Rows: the matmul as written (`x @ W.T`, allocating its B x n output) and into a reused
buffer (`mm out=`, no page faults: the stricter floor), the encode forward alone, the step,
the step with an Adam update, and the plain dense-autograd step (first shape only unless
--dense-all; --no-dense skips it). On CUDA the fused encode's and cuBLAS's TFLOP/s are printed too.

    python -m kernels.benchmarks.bench_train_step            # d=512, k=32, B=4096, n=16k and 64k
    python -m kernels.benchmarks.bench_train_step --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse

import torch

import kernels
from framework.optim import adam
from kernels.benchmarks.common import (
    bench, dense_step, machine_note, make_batch, make_sae, pick_device, print_table, sparse_step, zero_grads,
)

FULL_SHAPES = [(4096, 512, 16384, 32), (4096, 512, 65536, 32)]  # B, d, n, k
QUICK_SHAPES = [(512, 128, 4096, 16), (512, 128, 16384, 16)]


def run_shape(B, d, n, k, device, repeats, with_dense):
    p = make_sae(d, n, device)
    x = make_batch(B, d, device)
    w = p["encoder_weight"].detach()
    out = torch.empty(B, n, device=device)
    opt = adam(list(p.values()), 1e-4)  # the training default (fused)

    def encode_only():
        with torch.no_grad():
            kernels.topk_encode(x, w, p["encoder_bias"].detach(), p["b_dec"].detach(), k)

    def step():
        zero_grads(p)
        sparse_step(p, x, k)

    def step_adam():
        step()
        opt.step()

    def dense():
        zero_grads(p)
        dense_step(p, x, k)

    fns = {
        "matmul x@W.T": lambda: x @ w.T,
        "matmul out=": lambda: torch.mm(x, w.T, out=out),
        "encode fwd": encode_only,
        "train step": step,
        "train step+Adam": step_adam,
    }
    if with_dense:
        fns["dense-autograd step"] = dense
    times = bench(fns, device, repeats)
    floor, strict = times["matmul x@W.T"][0], times["matmul out="][0]
    flops = 2 * B * n * d
    rows = []
    for name, (best, med) in times.items():
        row = [f"B={B} d={d} n={n} k={k}", name, f"{best * 1e3:.1f}", f"{med * 1e3:.1f}",
               f"{best / floor:.2f}", f"{best / strict:.2f}"]
        if device.type == "cuda":
            row.append(f"{flops / best / 1e12:.1f}" if name in ("matmul x@W.T", "matmul out=", "encode fwd") else "")
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (min and median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-autograd step")
    ap.add_argument("--dense-all", action="store_true", help="dense step at every shape (default: first only)")
    ap.add_argument("--n", type=int, nargs="*", help="override the latent counts")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.n:
        shapes = [(shapes[0][0], shapes[0][1], n, shapes[0][3]) for n in args.n]
    print(f"# SAE training step vs one dense X @ W_enc^T ({machine_note(device)})")
    headers = ["shape", "what", "min ms", "median ms", "x floor", "x strict floor"]
    if device.type == "cuda":
        headers.append("TFLOP/s")
    rows = []
    for i, (B, d, n, k) in enumerate(shapes):
        with_dense = not args.no_dense and (i == 0 or args.dense_all)
        rows += run_shape(B, d, n, k, device, args.repeats, with_dense)
    print_table(headers, rows)
    print("floor = `x @ W.T` (allocates its output); strict floor = `torch.mm(..., out=buffer)`")


if __name__ == "__main__":
    main()
