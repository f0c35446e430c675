"""Shared pieces of the benchmarks: the SAE training step (sparse kernels or plain dense
autograd), a fair timer, and table printing."""

from __future__ import annotations

import os
import statistics
import time

import torch

import kernels


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_sae(d: int, n: int, device, dtype=torch.float32, seed: int = 0):
    """Tied init (W_enc = W_dec^T, unit decoder rows), zero biases: the standard recipe."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w_dec = torch.randn(n, d, generator=g, dtype=dtype)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    params = {
        "encoder_weight": w_dec.clone(),
        "encoder_bias": torch.zeros(n, dtype=dtype),
        "decoder_weight": w_dec,
        "b_dec": torch.zeros(d, dtype=dtype),
    }
    return {name: p.to(device).requires_grad_() for name, p in params.items()}


def make_batch(B: int, d: int, device, dtype=torch.float32, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=dtype).to(device)


def sparse_step(p, x, k):
    """One forward + backward with the sparse kernels (dispatch picks Triton on CUDA)."""
    values, idx = kernels.topk_encode(x, p["encoder_weight"], p["encoder_bias"], p["b_dec"], k)
    x_hat = kernels.sparse_decode(values, idx, p["decoder_weight"]) + p["b_dec"]
    loss = (x_hat - x).pow(2).sum(1).mean()
    loss.backward()
    return loss


def dense_step(p, x, k):
    """The plain dense-autograd TopK SAE step most codebases use: B x n pre-activations,
    torch.topk, a dense scatter and a dense decoder matmul, all through autograd."""
    pre = torch.relu((x - p["b_dec"]) @ p["encoder_weight"].T + p["encoder_bias"])
    values, idx = pre.topk(k, dim=1)
    acts = torch.zeros_like(pre).scatter(1, idx, values)
    x_hat = acts @ p["decoder_weight"] + p["b_dec"]
    loss = (x_hat - x).pow(2).sum(1).mean()
    loss.backward()
    return loss


def zero_grads(p):
    for t in p.values():
        t.grad = None


def bench(fns: dict, device, repeats: int, warmup: int = 1) -> dict:
    """Seconds per call of each fn: calls are interleaved round-robin so that machine noise
    (other processes, clocks) hits every candidate alike; reports min and median."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def machine_note(device) -> str:
    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"device: CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load:.2f}"


def print_table(headers, rows) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
