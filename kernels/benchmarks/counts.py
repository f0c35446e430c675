"""FLOP and byte counts of one SAE training step, sparse kernels vs dense autograd (the
formulas of kernels/README.md, evaluated for the benchmark shapes), and a per-kernel H100
roofline at the presets' shapes. Arithmetic, not timing.

    python -m kernels.benchmarks.counts [--roofline]
"""

from __future__ import annotations

import sys

from kernels.benchmarks.common import print_table

SHAPES = [(4096, 512, 16384, 32), (4096, 512, 65536, 32), (4096, 512, 262144, 32)]  # B, d, n, k
F32, IDX = 4, 8


def sparse_counts(B, d, n, k):
    """(flop, bytes) of the sparse step without the optimizer; d_out = d_in = d."""
    flop = {
        "encode matmul": 2 * B * n * d,
        "decode fwd (gather-sum)": 2 * B * k * d,
        "grad values (gather-dot)": 2 * B * k * d,
        "grad W_dec (scatter)": 2 * B * k * d,
        "grad W_enc (scatter)": 2 * B * k * d,
        "grad b_dec (matvec)": 2 * n * d,
    }
    moved = {
        "encode: read x, W_enc; write k values + indices": (B * d + n * d) * F32 + B * k * (F32 + IDX),
        "decode fwd: gather k rows of W_dec per token": B * k * d * F32 + B * d * F32,
        "grad values: gather the same rows again": B * k * d * F32 + B * d * F32,
        "grad W_dec, grad W_enc: write two dense n x d grads": 2 * n * d * F32 + 2 * B * d * F32,
        "grad b_dec: read W_enc once": n * d * F32,
    }
    return sum(flop.values()), sum(moved.values()), flop, moved


def dense_counts(B, d, n, k):
    """The dense-autograd step: 6 B x n x d matmuls (encoder fwd, decoder fwd, grad acts,
    grad W_dec, grad W_enc, grad of the centred input for b_dec), each B x n tensor written
    once and read about once (pre, relu out, acts, grad acts, grad pre: 5 tensors)."""
    flop = 6 * 2 * B * n * d
    moved = 5 * 2 * B * n * F32 + 4 * n * d * F32
    return flop, moved


def adam_bytes(d, n):
    params = 2 * n * d + n + d
    return params, 7 * F32 * params  # read p, g, m, v; write p, m, v


H100_FLOPS, H100_BYTES = 990e12, 3.35e12  # bf16 dense tensor cores; HBM3
BF16 = 2


def step_kernels(B, d, n, k, k_aux, n_dead, splits):
    """(kernel, FLOP, HBM bytes) of one bf16-autocast training step (x needs no gradient):
    W_enc is cast to bf16 once, the encode reads each W tile once from HBM (row blocks share it
    through L2) and x once per latent split; gathers and scatters touch d floats per (token,
    slot) pair (random rows: no L2 reuse assumed); atomics read and write; AuxK works on the
    n_dead dead latents' rows (copied by index) with k_aux slots."""
    def encode(nn, kk, kp, tag):
        return [
            (f"{tag}W_enc -> bf16 cast", 0, nn * d * (F32 + BF16)),
            (f"{tag}encode tiles (matmul + running top-{kp})", 2 * B * nn * d,
             nn * d * BF16 + splits * B * d * BF16 + B * splits * kp * IDX),
            (f"{tag}top-k of split lists + decode keys", 0, 2 * B * splits * kp * IDX + B * kk * (F32 + IDX + 1)),
            (f"{tag}decode fwd (gather-sum)", 2 * B * kk * d, B * kk * d * F32 + B * d * F32),
            (f"{tag}grad values (gather-dot)", 2 * B * kk * d, B * kk * d * F32 + B * d * F32),
            (f"{tag}grad W_dec (atomic scatter)", 2 * B * kk * d, nn * d * F32 + 2 * B * kk * d * F32 + B * d * F32),
            (f"{tag}grad W_enc, b_enc (atomic scatter)", 2 * B * kk * d, nn * d * F32 + 2 * B * kk * d * F32 + B * d * F32),
        ]
    def kp(kk):  # list length per split: triton_ops' KP_MIN = 32, KP_MAX = LARGE_KS = 128
        return 128 if kk > 128 else max(32, 1 << (kk - 1).bit_length())

    rows = encode(n, k, kp(k), "")
    rows.append(("grad b_dec (matvec)", 2 * n * d, n * d * F32))
    if n_dead:
        rows.append(("AuxK: dead rows of W_enc, W_dec (index copies)", 0, 2 * 2 * n_dead * d * F32))
        rows += encode(n_dead, k_aux, kp(k_aux), "AuxK: ")
    params = 2 * n * d + n + d
    rows.append(("Adam (fused)", 10 * params, 7 * F32 * params))
    return rows


def roofline():
    from kernels.benchmarks.aot import PRESETS  # noqa: PLC0415

    print("# predicted H100 time per kernel and step (990 TFLOP/s bf16, 3.35 TB/s; max of the two), "
          "AuxK with 10 % of the latents dead")
    for p in PRESETS:
        k = max(p.ks)
        splits = max(1, min(-(-2 * 132 // -(-p.batch // 64)), -(-p.n // 2048)))
        rows, total = [], 0.0
        for name, flop, moved in step_kernels(p.batch, p.d, p.n, k, p.k_aux, p.n // 10, splits):
            t = max(flop / H100_FLOPS, moved / H100_BYTES)
            total += t
            rows.append([name, f"{flop / 1e9:.1f}", f"{moved / 1e9:.2f}", f"{t * 1e6:.0f}",
                         "compute" if flop / H100_FLOPS >= moved / H100_BYTES else "memory"])
        matmul = 2 * p.batch * p.n * p.d / H100_FLOPS
        print(f"\n## {p.name}: B={p.batch} d={p.d} n={p.n} k={k} k_aux={p.k_aux}; step {total * 1e3:.2f} ms "
              f"predicted = {total / matmul:.1f} x the encoder matmul ({matmul * 1e3:.3f} ms)")
        print_table(["kernel", "GFLOP", "GB", "us", "bound"], rows)


def main():
    if "--roofline" in sys.argv[1:]:
        return roofline()
    rows = []
    for B, d, n, k in SHAPES:
        s_flop, s_bytes, flop, _ = sparse_counts(B, d, n, k)
        d_flop, d_bytes = dense_counts(B, d, n, k)
        params, a_bytes = adam_bytes(d, n)
        rows.append([
            f"B={B} d={d} n={n} k={k}",
            f"{flop['encode matmul'] / 1e9:.1f}",
            f"{(s_flop - flop['encode matmul']) / 1e9:.3f}",
            f"{s_flop / flop['encode matmul']:.4f}",
            f"{s_bytes / 2**20:.0f}",
            f"{d_flop / 1e9:.1f}",
            f"{d_bytes / 2**20:.0f}",
            f"{params / 1e6:.1f}M",
            f"{16 * params / 2**30:.3f}",
            f"{a_bytes / 2**20:.0f}",
        ])
    print("# per training step, fp32 (GFLOP; MiB of compulsory memory traffic)")
    print_table(["shape", "matmul GFLOP", "sparse rest GFLOP", "sparse / matmul", "sparse MiB",
                 "dense GFLOP", "dense MiB", "params", "params+grads+Adam GiB", "Adam MiB"], rows)


if __name__ == "__main__":
    main()
