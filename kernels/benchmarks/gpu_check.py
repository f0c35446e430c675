"""One-command device check of the Triton kernels on one CUDA GPU (torch + triton + this repo;
no deepspeed / transformers). Under 8 minutes on an H100/H200.

    python -m kernels.benchmarks.gpu_check            # on a CUDA GPU
    python -m kernels.benchmarks.gpu_check --dry-run  # CPU, Triton interpreter, tiny shapes

Prints, in order:
  1. parity of every kernel against float64 oracles built from PyTorch ops (the reference's
     semantics), at the presets' real shapes, with bf16 / tf32 / fp32 matmul operands: TopK
     encode values and selection (the large-k path for AuxK's k_aux = 2048 and for k = n),
     its gradients (atomic and deterministic scatters, the matvec), the decode gathers and
     scatters, and encode_at (g-SAE): max error and tolerance per check;
  2. TFLOP/s of the fused bf16 encode against torch.mm in bf16 on the same shape (target >= 80 %);
  3. the full SAETrainer.step (bf16 autocast, AuxK, fused Adam) against one bf16 encoder matmul
     (target <= 1.5x), its peak memory against params + grads + Adam, and the tuner's benchmark
     count (no re-tuning per step);
  4. training tokens/s at n = 2^15 .. 2^20, d = 4096, k = 64, B = 8192.
Exits 1 if any parity check fails (targets are reported, not enforced); 2 without a GPU
unless --dry-run. --dry-run runs the same code under TRITON_INTERPRET=1 at tiny shapes, with
shorter per-row lists so that the large-k path runs too; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

# (name, B, d, n, k, use_abs, masked fraction)
REAL_SHAPES = [
    ("gpt2 k=32", 4096, 768, 24576, 32, False, 0.0),
    ("llama k=64", 8192, 4096, 65536, 64, False, 0.0),
    ("llama abstopk k=64 masked", 8192, 4096, 65536, 64, True, 0.5),
    ("llama AuxK k_aux=2048", 8192, 4096, 20000, 2048, False, 0.0),
    ("gpt2 widening k=n", 1024, 768, 4096, 4096, False, 0.0),
]
DRY_SHAPES = [
    ("tiny abstopk masked", 13, 40, 96, 5, True, 0.5),
    ("tiny large k=40", 11, 24, 150, 40, False, 0.0),
    ("tiny widening k=n", 9, 24, 60, 60, True, 0.0),
]
# modes: (name, compute dtype, tf32); gradients always use the fp32 masters
MODES = [("bf16", torch.bfloat16, False), ("tf32", torch.float32, True), ("fp32", torch.float32, False)]
# relative tolerance of the selected scores / values per mode (vs float64 of the rounded operands)
FWD_TOL = {"bf16": 2e-4, "tf32": 1e-2, "fp32": 2e-5}
GRAD_TOL = 2e-4  # gradients: fp32 accumulation against float64


@dataclass
class Check:
    what: str
    shape: str
    mode: str
    err: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.err) and self.err <= self.tol


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for two empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _inputs(B, d, n, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    w = torch.randn(n, d, generator=g) / math.sqrt(d)
    b_enc = torch.randn(n, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    w_dec = torch.randn(n, d, generator=g) / math.sqrt(d)
    return [t.to(device) for t in (x, w, b_enc, b_dec, w_dec)]


def _sparse(idx, coef, n):
    """[B, n] float64 sparse matrix with coef at (row, idx)."""
    B, k = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), coef.reshape(-1).double(), (B, n)).coalesce()


def _gather_dot64(idx, table, vec):
    """out[b, j] = <vec[b], table[idx[b, j]]> in float64, in row chunks (bounded memory)."""
    B, k = idx.shape
    step = max(1, (1 << 26) // (k * table.shape[1]))
    out = torch.empty(B, k, dtype=torch.float64, device=idx.device)
    for r in range(0, B, step):
        out[r:r + step] = torch.bmm(table[idx[r:r + step]].double(), vec[r:r + step].double().unsqueeze(2)).squeeze(2)
    return out


def _live(values, idx, use_abs, mask):
    """The entries the kernel passed through (they carry gradient): its own decision, so that
    a pre-activation within rounding of 0 cannot make the oracle disagree."""
    if not use_abs:
        return values != 0
    return mask[idx] if mask is not None else torch.ones_like(idx, dtype=torch.bool)


def _topk_checks(values, idx, pre, k, use_abs, mask, shape, mode):
    """Selection and values of the encode against float64 pre-activations of the same operands."""
    B, n = pre.shape
    score = pre.abs() if use_abs else pre.clone()
    if mask is not None:
        score[:, ~mask] = float("-inf")
    bad_idx = float(((idx < 0) | (idx >= n)).any())
    srt = idx.sort(1).values
    dup = float((srt[:, 1:] == srt[:, :-1]).any()) if k > 1 else 0.0
    picked = score.gather(1, idx.clamp(0, n - 1))
    best = score.topk(k, dim=1).values
    fin = torch.isfinite(best)
    scale = float(best[fin].abs().max()) if bool(fin.any()) else 1.0
    sel_err = float(torch.where(fin, picked.sort(1, descending=True).values - best, 0.0).abs().max()) / scale
    sel_err += float((torch.isfinite(picked) != fin).any()) * 1e30  # masked latents picked over allowed ones
    sel = pre.gather(1, idx.clamp(0, n - 1))
    want = torch.where(torch.isfinite(picked) & ((sel > 0) | use_abs), sel, torch.zeros((), dtype=sel.dtype,
                                                                                       device=sel.device))
    tol = FWD_TOL[mode]
    return [
        Check("encode indices in range, distinct", shape, mode, bad_idx + dup, 0.0),
        Check("encode selection (k best scores)", shape, mode, sel_err, tol),
        Check("encode values", shape, mode, _rel(values, want), tol),
    ]


def parity(shapes, device, kernels_mod, T, full_modes_for=1):
    """Every kernel against float64 oracles; modes beyond bf16 for the first `full_modes_for` shapes."""
    checks = []
    for si, (name, B, d, n, k, use_abs, masked) in enumerate(shapes):
        x, w, b_enc, b_dec, w_dec = _inputs(B, d, n, device, seed=si)
        mask = None
        if masked:
            mask = torch.rand(n, generator=torch.Generator().manual_seed(si)) >= masked
            mask = mask.to(device)
        for mode, dt, tf32 in MODES if si < full_modes_for else MODES[:1]:
            leaves = [t.clone().requires_grad_() for t in (x, w, b_enc, b_dec)]
            values, idx = kernels_mod.topk_encode(*leaves, k, use_abs=use_abs, latent_mask=mask,
                                                  compute_dtype=dt, tf32=tf32, deterministic=False)
            xc = (x - b_dec).to(dt)
            pre = xc.double() @ w.to(dt).double().T + b_enc.double()
            checks += _topk_checks(values.detach(), idx, pre, k, use_abs, mask, name, mode)
            live = _live(values.detach(), idx, use_abs, mask)
            del pre
            # gradients for the kernel's own selection: float64 sparse oracles
            up = torch.randn(values.shape, generator=torch.Generator().manual_seed(7)).to(device)
            (values * up).sum().backward()
            g = torch.where(live, up.double(), 0.0)
            G = _sparse(idx, g, n)
            xc64 = (x - b_dec).double()
            grad_x = torch.sparse.mm(G, w.double())
            grad_w = torch.sparse.mm(G.t(), xc64)
            grad_b = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, idx.reshape(-1), g.reshape(-1))
            for label, mine, want in [("x", leaves[0].grad, grad_x), ("W_enc (atomic scatter)", leaves[1].grad, grad_w),
                                      ("b_enc", leaves[2].grad, grad_b), ("b_dec (matvec)", leaves[3].grad, -grad_x.sum(0))]:
                checks.append(Check(f"encode grad {label}", name, mode, _rel(mine, want), GRAD_TOL))
            if mode == "bf16":
                leaves2 = [t.clone().requires_grad_() for t in (x, w, b_enc, b_dec)]
                v2, i2 = kernels_mod.topk_encode(*leaves2, k, use_abs=use_abs, latent_mask=mask, compute_dtype=dt,
                                                 deterministic=True)
                (v2 * up).sum().backward()
                G2 = _sparse(i2, torch.where(_live(v2.detach(), i2, use_abs, mask), up.double(), 0.0), n)
                checks.append(Check("encode grad W_enc (deterministic scatter)", name, mode,
                                    _rel(leaves2[1].grad, torch.sparse.mm(G2.t(), xc64)), GRAD_TOL))
                checks += _decode_checks(values.detach(), idx, w_dec, name, kernels_mod)
                checks += _encode_at_checks(x, w, b_enc, b_dec, idx, name, kernels_mod)
            del leaves, values, idx, G, grad_x, grad_w
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return checks


def _decode_checks(values, idx, w_dec, name, kernels_mod):
    """sparse_decode forward (gather-sum), grad values (gather-dot), grad W_dec (both scatters)."""
    n = w_dec.shape[0]
    out = []
    for det in (False, True):
        v = values.clone().requires_grad_()
        wd = w_dec.clone().requires_grad_()
        x_hat = kernels_mod.sparse_decode(v, idx, wd, deterministic=det)
        up = torch.randn(x_hat.shape, generator=torch.Generator().manual_seed(3)).to(x_hat.device)
        (x_hat * up).sum().backward()
        G = _sparse(idx, values, n)
        tag = "deterministic" if det else "atomic"
        if not det:
            out.append(Check("decode forward (gather-sum)", name, "fp32", _rel(x_hat, torch.sparse.mm(G, w_dec.double())),
                             GRAD_TOL))
            out.append(Check("decode grad values (gather-dot)", name, "fp32", _rel(v.grad, _gather_dot64(idx, w_dec, up)),
                             GRAD_TOL))
        out.append(Check(f"decode grad W_dec ({tag} scatter)", name, "fp32",
                         _rel(wd.grad, torch.sparse.mm(G.t(), up.double())), GRAD_TOL))
    return out


def _encode_at_checks(x, w, b_enc, b_dec, idx, name, kernels_mod):
    """encode_at (g-SAE's values at a given selection): values and grad W_enc."""
    leaves = [t.clone().requires_grad_() for t in (x, w, b_enc, b_dec)]
    vals = kernels_mod.encode_at(*leaves, idx)
    pre = _gather_dot64(idx, w, x - b_dec) + b_enc.double()[idx]
    want = pre.clamp_min(0)
    vals.sum().backward()
    G = _sparse(idx, (pre > 0).double(), w.shape[0])
    return [Check("encode_at values", name, "fp32", _rel(vals, want), GRAD_TOL),
            Check("encode_at grad W_enc", name, "fp32", _rel(leaves[1].grad, torch.sparse.mm(G.t(), (x - b_dec).double())),
                  GRAD_TOL)]


# ----------------------------------------------------------------------------------------
# speed


def _time(fn, device, repeats) -> float:
    """Median seconds per call (after one warm-up call, two with more repeats)."""
    from kernels.benchmarks.common import bench  # noqa: PLC0415

    return bench({"f": fn}, device, repeats, warmup=1 if repeats < 4 else 2)["f"][1]


def encode_throughput(B, d, n, k, device, kernels_mod, T, repeats):
    x, w, b_enc, b_dec, _ = _inputs(B, d, n, device, seed=11)
    xb, wb = (x - b_dec).bfloat16(), w.bfloat16()
    flop = 2 * B * n * d
    t_mm = _time(lambda: torch.mm(xb, wb.T), device, repeats)
    t_kernel = _time(lambda: T.encode_forward(xb, wb, b_enc, k, precision="ieee", out_dtype=torch.float32), device, repeats)
    with torch.no_grad():
        t_op = _time(lambda: kernels_mod.topk_encode(x, w, b_enc, b_dec, k, compute_dtype=torch.bfloat16), device, repeats)
    return {"torch.mm bf16": (t_mm, flop / t_mm / 1e12), "fused encode kernel bf16": (t_kernel, flop / t_kernel / 1e12),
            "topk_encode op (incl. bf16 casts)": (t_op, flop / t_op / 1e12)}, t_mm


def _trainer(B, d, n, k, device, autocast):
    from framework.schema import SAEConfig, TrainConfig  # noqa: PLC0415
    from framework.sae_trainer import SAETrainer  # noqa: PLC0415

    cfg = SAEConfig(name="check", site="x", n_latents=n, k=k, dead_after_tokens=B, b_dec_init="zeros",
                    normalize_activations=False)
    tcfg = TrainConfig(batch_size=B, autocast="bfloat16" if autocast else "none", warmup_steps=1)
    return SAETrainer(cfg, tcfg, "x", "x", {"x": d}, total_steps=10_000, device=device, seed=0)


def train_step(B, d, n, k, device, steps, autocast=True):
    """(seconds per SAETrainer.step, peak bytes, params+grads+Adam bytes, tuner benchmarks)."""
    from kernels import triton_ops as T  # noqa: PLC0415

    tr = _trainer(B, d, n, k, device, autocast)
    g = torch.Generator(device="cpu").manual_seed(5)
    batches = [torch.randn(B, d, generator=g).to(device) for _ in range(2)]
    for i in range(2 if steps > 1 else 1):  # warm-up: compile, tune, allocate the optimizer state
        tr.step(batches[i % 2], batches[i % 2])
    params = sum(p.numel() for p in tr.sae.parameters())
    tuned_before = T._ENCODE_TUNER.benchmarks
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        tr.step(batches[i % 2], batches[i % 2])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    times.sort()
    return times[len(times) // 2], peak, 16 * params, T._ENCODE_TUNER.benchmarks - tuned_before


# ----------------------------------------------------------------------------------------


def _row(*cells):
    print("  ".join(str(c) for c in cells), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton / the kernels are imported
        ops = sys.modules.get("kernels.triton_ops")
        if ops is not None and not ops.INTERPRET:
            raise RuntimeError("--dry-run must set TRITON_INTERPRET before kernels.triton_ops is imported")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for the CPU interpreter check)")
        return 2
    else:
        device = torch.device("cuda")
    import triton  # noqa: PLC0415

    import kernels  # noqa: PLC0415
    from kernels import dispatch  # noqa: PLC0415
    from kernels import triton_ops as T  # noqa: PLC0415

    t_start = time.perf_counter()
    if args.dry_run:
        T.KP_MAX, T.LARGE_KS = 16, 16  # tiny shapes still take the large-k path
        shapes, full_modes = DRY_SHAPES, 1
        tp_shape = step_shape = (16, 16, 64, 4)
        sweep, reps = [2**6], 1
    else:
        shapes, full_modes = REAL_SHAPES, 1
        tp_shape, step_shape, sweep, reps = (8192, 4096, 65536, 64), (8192, 4096, 65536, 64), \
            [2**p for p in range(15, 21)], 10
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"gpu_check on {name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"backend for these tensors: {dispatch.backend_for(torch.empty(0, device=device)).__name__}", flush=True)

    print("\n== parity against float64 oracles (max relative error; fail if above tolerance)", flush=True)
    checks = parity(shapes, device, kernels, T, full_modes)
    width = max(len(c.what) for c in checks)
    for c in checks:
        _row(c.what.ljust(width), c.shape.ljust(26), c.mode.ljust(4), f"err {c.err:9.2e}", f"tol {c.tol:7.1e}",
             "ok" if c.ok else "FAIL")
    failures = [c for c in checks if not c.ok]
    print(f"parity: {len(checks) - len(failures)} / {len(checks)} checks ok "
          f"({time.perf_counter() - t_start:.0f} s so far)", flush=True)

    B, d, n, k = tp_shape
    print(f"\n== encode throughput, B={B} d={d} n={n} k={k} (target: fused >= 80 % of torch.mm bf16)", flush=True)
    rows, t_mm = encode_throughput(B, d, n, k, device, kernels, T, reps)
    for label, (t, tflops) in rows.items():
        _row(label.ljust(34), f"{t * 1e3:9.3f} ms", f"{tflops:8.1f} TFLOP/s", f"{t_mm / t:6.1%} of torch.mm")

    B, d, n, k = step_shape
    print(f"\n== SAETrainer.step, bf16 autocast, AuxK, Adam: B={B} d={d} n={n} k={k} (target <= 1.5x one bf16 matmul)",
          flush=True)
    t_step, peak, state, tuned = train_step(B, d, n, k, device, steps=reps)
    _row(f"step {t_step * 1e3:.3f} ms", f"= {t_step / t_mm:.2f} x the bf16 encoder matmul ({t_mm * 1e3:.3f} ms)")
    _row(f"peak memory {peak / 2**30:.2f} GiB", f"= {peak / state:.2f} x params+grads+Adam ({state / 2**30:.2f} GiB)")
    _row(f"encode tuner benchmarks during {reps} steps after warm-up: {tuned} (0 = no re-tuning)")

    print(f"\n== training tokens/s, d={d} k={k} B={B}, bf16 autocast + AuxK + Adam", flush=True)
    for n in sweep:
        try:
            t_step, peak, state, _ = train_step(B, d, n, k, device, steps=max(1, reps // 2))
            _row(f"n={n:>8}", f"{t_step * 1e3:9.3f} ms/step", f"{B / t_step:12.0f} tokens/s",
                 f"peak {peak / 2**30:7.2f} GiB (state {state / 2**30:.2f} GiB)")
        except torch.cuda.OutOfMemoryError as err:
            _row(f"n={n:>8}", "out of memory:", str(err).splitlines()[0][:100])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)
    if failures:
        print(f"PARITY FAILED: {len(failures)} check(s): " + "; ".join(f"{c.what} [{c.shape}, {c.mode}]"
                                                                     for c in failures[:10]))
        return 1
    print("PARITY OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
