"""FLOP and byte counts of one SAE training step, sparse kernels vs dense autograd (the
formulas of kernels/README.md, evaluated for the benchmark shapes). Arithmetic, not timing.

    python -m kernels.benchmarks.counts
"""

from __future__ import annotations

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


def main():
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
