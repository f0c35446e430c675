"""Ahead-of-time compilation of every Triton kernel for A100 (sm_80) and H100 (sm_90), on a
machine without a GPU: what the framework can launch at the presets' shapes, and what ptxas
makes of it (registers, spills, shared memory, and the encode matmul's instruction class).

    python -m kernels.benchmarks.aot [--targets 80,90] [--kernels encode_tiles,merge] [--workers N]

What is compiled: for each preset (configs/*.yaml) the launches of a training step, the
AuxK encode at k_aux = d_in / 2 and the BatchTopK/threshold widening up to k = n_latents, for
each compute mode the framework can run (bf16 autocast, fp32 with TF32, fp32 with TF32 off),
with every config the encode tuner can pick. Shapes are runtime ints, so only constexpr
combinations (and the divisibility Triton specialises on) give distinct binaries: those are
deduplicated. The launch parameters come from the same functions the launchers call
(`triton_ops.encode_configs`, `*_config`, `large_split_len`), so this covers what runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

TARGETS = (80, 90)


@dataclass(frozen=True)
class Preset:
    """A config's SAE shape; d comes from its model, k_aux = d // 2 (the trainer's default)."""

    name: str
    d: int
    n: int
    ks: tuple[int, ...]
    batch: int

    @property
    def k_aux(self) -> int:
        return max(1, self.d // 2)


# n_latents / k / train.batch_size of the training configs/*.yaml (tests/test_kernels_aot.py checks them).
PRESETS = (
    Preset("debug", 64, 256, (8,), 512),
    Preset("smollm2_main", 576, 4096, (32, 16), 1024),
    Preset("gpt2_small", 768, 24576, (32,), 4096),
    Preset("pythia_160m", 768, 32768, (32,), 4096),
    Preset("pythia_410m", 1024, 65536, (64,), 8192),
    Preset("llama3_8b_all_layers", 4096, 65536, (64,), 8192),
    Preset("smollm2_resid25", 576, 4096, (32,), 1024),
    Preset("smollm2_transcoders", 576, 4096, (32,), 1024),
    Preset("smollm2_clts", 576, 4096, (32,), 1024),  # per layer (a CLT runs the kernels layer by layer)
    Preset("vision_tiny", 64, 256, (8,), 136),
    Preset("vision_clip_b32", 768, 12288, (32,), 4096),
)

# (operand dtype, tl.dot precision): bf16 autocast, fp32 with TF32 (the CUDA default), fp32 exact
COMPUTE_MODES = (("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee"))
STORAGE = "fp32"  # parameters, values and gradients: fp32 master tensors


@dataclass(frozen=True)
class Spec:
    """One binary: a kernel with its argument types, constexprs and launch options."""

    kernel: str
    args: tuple  # (name, pointer type "*fp32" or an int value the runtime would pass)
    consts: tuple  # (name, value)
    num_warps: int
    num_stages: int
    target: int
    note: str = field(default="", compare=False)  # the first launch that needs this binary
    uses: tuple = field(default=(), compare=False)  # every launch that needs it

    @property
    def mode(self) -> str:
        """Operand type of the matmul (bf16 / tf32 / fp32), or of the data for other kernels."""
        ptrs = dict(self.args)
        if "xc_ptr" in ptrs:
            return "bf16" if ptrs["xc_ptr"] == "*bf16" else "tf32" if dict(self.consts)["PRECISION"] == "tf32" else "fp32"
        return STORAGE

    @property
    def label(self) -> str:
        short = {"BLOCK_B": "B", "BLOCK_N": "N", "BLOCK_D": "D", "BLOCK_K": "K", "BLOCK_E": "E", "BLOCK": "",
                 "KP": "KP", "WITH_BIAS": "bias"}
        parts = [f"{short[k]}{v}" if k != "WITH_BIAS" else ("bias" if v else "") for k, v in self.consts if k in short]
        return " ".join([p for p in parts if p] + [f"w{self.num_warps}s{self.num_stages}", self.mode])


def _ops():
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
    from kernels import triton_ops  # noqa: PLC0415

    if triton_ops.INTERPRET:
        raise RuntimeError("kernels.triton_ops was imported under TRITON_INTERPRET=1; run the AOT compile in a "
                           "process without it")
    return triton_ops


def _spec(T, kernel, target, cfg, note="", **args):
    consts = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    fn = getattr(T, kernel)
    names = [p.name for p in fn.params]
    consts.update({k: v for k, v in args.items() if k in names and fn.params[names.index(k)].is_constexpr})
    rt = tuple((k, args[k]) for k in names if not fn.params[names.index(k)].is_constexpr)
    return Spec(kernel, rt, tuple(sorted(consts.items())), cfg["num_warps"], cfg["num_stages"], target, note)


def _encode_specs(T, target, preset, k, n, dtype, precision, note):
    """Tile kernel (every config the tuner may pick) + key decode, for one width k."""
    import triton  # noqa: PLC0415

    B, D = preset.batch, preset.d
    large = k > T.KP_MAX
    kp = T.LARGE_KS if large else max(T.KP_MIN, triton.next_power_of_2(k))
    split = T.large_split_len(n, k) if large else 2048
    esize = 2 if dtype == "bf16" else 4
    ptrs = dict(xc_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{STORAGE}", mask_ptr="*i8", cand_ptr="*i64")
    ints = dict(B=B, N=n, D=D, SPLIT_LEN=split, NUM_SPLITS=2, USE_ABS=0, HAS_MASK=0)
    out = [_spec(T, "_encode_tiles_kernel", target, cfg, note, KP=kp, UPCAST=False, PRECISION=precision,
                 **ptrs, **ints) for cfg in T.encode_configs(kp, esize, precision, target, interpret=False)]
    out.append(_spec(T, "_decode_keys_kernel", target, T.decode_keys_config(interpret=False), note,
                     keys_ptr="*i64", val_ptr=f"*{STORAGE}", idx_ptr="*i64", live_ptr="*i8", TOTAL=B * k, USE_ABS=0))
    return out


def _sparse_specs(T, target, preset, k, note):
    """The O(B*k*d) kernels of one step at width k (all fp32 storage)."""
    B, D, n = preset.batch, preset.d, preset.n
    f = f"*{STORAGE}"
    out = [
        _spec(T, "_gather_sum_kernel", target, T.gather_sum_config(D, interpret=False), note,
              idx_ptr="*i64", val_ptr=f, table_ptr=f, out_ptr=f, B=B, K=k, D=D),
        _spec(T, "_gather_dot_kernel", target, T.gather_dot_config(k, interpret=False), note,
              idx_ptr="*i64", table_ptr=f, vec_ptr=f, out_ptr=f, B=B, K=k, D=D),
        _spec(T, "_matvec_kernel", target, T.matvec_config(D, interpret=False), note,
              v_ptr=f, w_ptr=f, part_ptr=f, N=n, D=D, CHUNK=T.matvec_chunk(n, interpret=False)),
    ]
    for with_bias in (False, True):
        out.append(_spec(T, "_scatter_atomic_kernel", target, T.scatter_atomic_config(D, interpret=False), note,
                         idx_ptr="*i64", coef_ptr=f, rows_ptr=f, out_ptr=f, bias_out_ptr=f, B=B, K=k, D=D,
                         WITH_BIAS=with_bias))
        out.append(_spec(T, "_scatter_segments_kernel", target, T.scatter_segments_config(D, interpret=False), note,
                         seg_ptr="*i64", tok_ptr="*i64", coef_ptr=f, rows_ptr=f, out_ptr=f, bias_out_ptr=f, D=D,
                         WITH_BIAS=with_bias))
    return out


def _binary_key(T, spec: Spec):
    """What makes a distinct binary: the specialised signature, constexprs, options, target."""
    sig, consts, attrs = _signature(getattr(T, spec.kernel), spec)
    return (spec.kernel, tuple(sig.items()), tuple(sorted(consts.items())), tuple(sorted(attrs)),
            spec.num_warps, spec.num_stages, spec.target)


def launch_specs(targets=TARGETS, presets=PRESETS, kernels=None) -> list[Spec]:
    """Every distinct binary of the presets' launches (first occurrence's note kept)."""
    T = _ops()
    specs: dict[tuple, Spec] = {}
    uses: dict[tuple, list] = {}

    def add(s):
        key = _binary_key(T, s)
        specs.setdefault(key, s)
        uses.setdefault(key, []).append(s.note)

    for target in targets:
        for p in presets:
            widths = [(k, p.n, f"{p.name} k={k}") for k in p.ks]
            widths.append((min(p.k_aux, p.n), p.n, f"{p.name} AuxK k_aux={p.k_aux}"))
            widths.append((p.n, p.n, f"{p.name} widening k=n={p.n}"))
            for k, n, note in widths:
                for dtype, precision in COMPUTE_MODES:
                    for s in _encode_specs(T, target, p, k, n, dtype, precision, note):
                        add(s)
                for s in _sparse_specs(T, target, p, k, note):
                    add(s)
    out = [dataclasses.replace(s, uses=tuple(dict.fromkeys(uses[key]))) for key, s in specs.items()]
    if kernels:
        out = [s for s in out if any(name in s.kernel for name in kernels)]
    return out


# ----------------------------------------------------------------------------------------
# compiling one spec


def _bin(tool: str) -> str:
    import triton  # noqa: PLC0415

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _signature(fn, spec: Spec):
    """(signature, constexprs, attrs) as Triton's launcher would specialise these arguments:
    16-byte aligned pointers, ints divisible by 16 marked so, ints equal to 1 as constants."""
    from triton._C.libtriton import native_specialize_impl  # noqa: PLC0415
    from triton.backends.compiler import BaseBackend  # noqa: PLC0415

    sig, consts, attrs = {}, dict(spec.consts), {}
    args = dict(spec.args)
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        v = args[p.name]
        if isinstance(v, str):
            sig[p.name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.do_not_specialize:
            sig[p.name] = "i32"
        else:
            ty, how = native_specialize_impl(BaseBackend, v, False, True, True)
            if ty == "constexpr":
                sig[p.name], consts[p.name] = "constexpr", v
            else:
                sig[p.name] = ty
                if how == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _instruction_class(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    if "fma.rn.f32" in ptx:
        return "fma"
    return "-"


def compile_spec(spec: Spec) -> dict:
    """Compile one spec; returns the table row (or the error)."""
    import triton  # noqa: PLC0415
    from triton import knobs  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    T = _ops()
    fn = getattr(T, spec.kernel)
    sig, consts, attrs = _signature(fn, spec)
    more = f" (+{len(spec.uses) - 1} more)" if len(spec.uses) > 1 else ""
    row = {"kernel": spec.kernel.strip("_").removesuffix("_kernel"), "config": spec.label,
           "target": f"sm_{spec.target}", "note": spec.note + more}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                      target=GPUTarget("cuda", spec.target, 32),
                                      options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as err:  # reported as a row: the test asserts there are none
        row.update(error=f"{type(err).__name__}: {str(err)[:2000]}", seconds=time.perf_counter() - t0)
        return row
    row["seconds"] = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    text = log.getvalue()
    stores = [int(v) for v in re.findall(r"(\d+) bytes spill stores", text)]
    loads = [int(v) for v in re.findall(r"(\d+) bytes spill loads", text)]
    row.update(
        regs=int(regs.group(1)) if regs else -1,
        stack=int(stack.group(1)) if stack else -1,
        spills=(sum(stores) + sum(loads)) if stores or loads else -1,
        smem=int(compiled.metadata.shared),
        insn=_instruction_class(compiled.asm["ptx"]),
        fma=compiled.asm["ptx"].count("fma.rn.f32"),
    )
    return row


def _worker_init(cache_dir: str):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # a fresh cache: every binary goes through ptxas


def compile_all(specs: list[Spec], workers: int | None = None, cache_dir: str | None = None) -> list[dict]:
    """Compile in a pool of fresh (spawned) processes, into `cache_dir` (default: a new
    temporary folder, so that ptxas runs and reports spills for every binary)."""
    import multiprocessing  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sparsemill-aot-"))
        workers = workers or max(1, min(len(specs), os.cpu_count() or 1))
        ctx = multiprocessing.get_context("spawn")
        # longest first: the encode tiles dominate, so the pool ends evenly
        order = sorted(range(len(specs)), key=lambda i: specs[i].kernel != "_encode_tiles_kernel")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,)) as pool:
            rows = dict(zip(order, pool.map(compile_spec, [specs[i] for i in order])))
    return [rows[i] for i in range(len(specs))]


def limit_of(target: str) -> int:
    return _ops().smem_limit(int(target.removeprefix("sm_")))


def print_rows(rows: list[dict]) -> None:
    from kernels.benchmarks.common import print_table  # noqa: PLC0415

    headers = ["kernel", "config", "target", "regs", "spills", "smem", "insn", "s", "needed by"]
    table = []
    for r in sorted(rows, key=lambda r: (r["target"], r["kernel"], r["config"])):
        if "error" in r:
            table.append([r["kernel"], r["config"], r["target"], "ERROR", "", "", r["error"][:60], "", r["note"]])
        else:
            table.append([r["kernel"], r["config"], r["target"], r["regs"], r["spills"], r["smem"], r["insn"],
                          f"{r['seconds']:.1f}", r["note"]])
    print_table(headers, table)


def print_summary(rows: list[dict]) -> None:
    """One line per (kernel, mode, target): binaries, worst registers / spills / shared memory."""
    from kernels.benchmarks.common import print_table  # noqa: PLC0415

    groups: dict[tuple, list] = {}
    for r in rows:
        mode = r["config"].split()[-1]
        groups.setdefault((r["kernel"], mode, r["target"]), []).append(r)
    table = []
    for (kernel, mode, target), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        table.append([kernel, mode, target, len(rs), len(rs) - len(ok), max((r["regs"] for r in ok), default="-"),
                      max((r["spills"] for r in ok), default="-"), max((r["smem"] for r in ok), default="-"),
                      limit_of(target), "/".join(sorted({r["insn"] for r in ok}))])
    print_table(["kernel", "mode", "target", "binaries", "errors", "max regs", "max spills", "max smem", "smem limit",
                 "insn"], table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--kernels", default="", help="comma-separated substrings of kernel names")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--summary", action="store_true", help="also print one line per kernel, mode and target")
    args = ap.parse_args(argv)
    specs = launch_specs(tuple(int(t) for t in args.targets.split(",")),
                         kernels=[k for k in args.kernels.split(",") if k] or None)
    t0 = time.perf_counter()
    rows = compile_all(specs, args.workers)
    print_rows(rows)
    if args.summary:
        print()
        print_summary(rows)
    bad = [r for r in rows if "error" in r or r["spills"] != 0 or r["smem"] > limit_of(r["target"])]
    print(f"\n{len(rows)} binaries in {time.perf_counter() - t0:.0f} s ({os.cpu_count()} cores); {len(bad)} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
