"""Peak memory of one SAE training step (forward, backward, Adam) against the bytes that
must exist anyway: params + grads + Adam's two moments = 4 x params (fp32).

Each measurement runs in a fresh subprocess so that nothing left by another run (allocator
caches, other tensors) is counted, and measures the second step (the first creates Adam's
moments). Forward + backward and Adam.step are measured separately, with the fused Adam that
training uses (`framework.optim.adam`; torch's default Adam would add two n x d temporaries
per parameter at its step).
  * CUDA: torch.cuda.max_memory_allocated(), i.e. every live tensor byte at the worst moment.
  * CPU: PyTorch's CPU allocator keeps no statistics, so the process' peak resident set is
    read instead: writing 5 to /proc/self/clear_refs resets the kernel's high-water mark
    (VmHWM) before each phase, and VmHWM minus the RSS the process had before the SAE was
    made (after a tiny warm-up step has paged in the libraries' code) is reported. This
    counts what really sat in RAM, including glibc heap that was freed but not returned,
    so it can only over-state the working memory.

The sparse step (TopK encode + sparse decode) is compared with a plain dense-autograd TopK
step, whose B x n activations dominate. At the full shape (B=4096, n=262144) those are
4 GiB each, so by default the dense step runs at a smaller batch (--dense-batch), next to
the sparse step at that same batch; --full-dense runs it at the full batch too.

    python -m kernels.benchmarks.bench_memory            # d=512, n=262144, k=32, B=4096
    python -m kernels.benchmarks.bench_memory --quick
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch

from framework.optim import adam
from kernels.benchmarks.common import (
    dense_step, machine_note, make_batch, make_sae, pick_device, print_table, sparse_step, zero_grads,
)

GiB = 2**30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(mode: str, B: int, d: int, n: int, k: int, device_name: str) -> dict:
    device = pick_device(device_name)
    step = {"sparse": sparse_step, "dense": dense_step}[mode]
    on_cpu = device.type == "cpu"
    # a tiny step first pages in the libraries' code (MKL, sparse kernels) and the modules
    # Adam imports lazily (torch._dynamo), none of which is training memory; the baseline
    # is taken after it
    tiny = make_sae(min(d, 64), 256, device)
    step(tiny, make_batch(64, min(d, 64), device), min(k, 8))
    adam(list(tiny.values()), 1e-4).step()
    del tiny
    gc.collect()
    if on_cpu:
        base = _status_kib("VmRSS") * 1024
    p = make_sae(d, n, device)
    x = make_batch(B, d, device)
    opt = adam(list(p.values()), 1e-4)  # the training default (fused)
    zero_grads(p)
    step(p, x, k)
    opt.step()  # Adam's moments now exist
    zero_grads(p)
    gc.collect()

    def start():
        if on_cpu:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS mark to the current RSS
        else:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def peak():
        if on_cpu:
            return _status_kib("VmHWM") * 1024 - base
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    start()
    step(p, x, k)
    peak_step = peak()
    start()
    opt.step()
    peak_adam = peak()
    n_params = sum(t.numel() for t in p.values())
    return {"mode": mode, "B": B, "peak_step": peak_step, "peak_adam": peak_adam,
            "state": 4 * 4 * n_params, "batch": x.numel() * 4}


def measure(mode, B, d, n, k, device_name) -> dict:
    cmd = [sys.executable, "-m", "kernels.benchmarks.bench_memory", "--worker", mode,
           "--shape", str(B), str(d), str(n), str(k), "--device", device_name]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dense-batch", type=int, default=None, help="batch of the dense-autograd comparison")
    ap.add_argument("--full-dense", action="store_true", help="also run the dense step at the full batch")
    ap.add_argument("--worker", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs=4, metavar=("B", "d", "n", "k"), help="override B d n k")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, *args.shape, args.device)))
        return
    device = pick_device(args.device)
    B, d, n, k = args.shape or ((512, 128, 16384, 16) if args.quick else (4096, 512, 262144, 32))
    dense_B = args.dense_batch or (B if args.quick else 512)
    runs = [("sparse", B)]
    if dense_B != B:
        runs.append(("sparse", dense_B))
    runs.append(("dense", dense_B))
    if args.full_dense and dense_B != B:
        runs.append(("dense", B))
    print(f"# Peak memory of one training step, d={d} n={n} k={k} ({machine_note(device)})")
    rows = []
    for mode, b in runs:
        r = measure(mode, b, d, n, k, args.device)
        work = r["peak_step"] - r["state"] - r["batch"]
        worst = max(r["peak_step"], r["peak_adam"])
        rows.append([mode, b, f"{r['state'] / GiB:.3f}", f"{r['peak_step'] / GiB:.3f}", f"{work / GiB:.3f}",
                     f"{r['peak_adam'] / GiB:.3f}", f"{worst / r['state']:.2f}", f"{n * b * 4 / GiB:.3f}"])
    print_table(["step", "B", "params+grads+Adam GiB", "fwd+bwd peak GiB", "fwd+bwd above state+batch GiB",
                 "Adam.step peak GiB", "worst peak / state", "one B x n fp32 GiB"], rows)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS increase (VmHWM)"
    print(f"peaks measured as {how} above the process before the SAE existed; "
          "state = 4 x params x 4 bytes (params, grads, Adam m and v)")


if __name__ == "__main__":
    main()
