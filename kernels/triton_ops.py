"""Triton kernels for the SAE's sparse math, same semantics and signatures as kernels.reference.

Encode forward (the only O(B*n*d) part) is one fused kernel: each program owns a block of
rows and a range of latents (a "split"), computes pre = xc @ W_enc^T + b_enc one
[rows x latents] tile at a time on the tensor cores (bf16, or tf32 for fp32, fp32
accumulation) and keeps a running top-KP per row in registers, so nothing of size B x n is
ever written. The running list is updated by insertion: per tile, only entries above the
row's current KP-th best are extracted (a few per row once the list has filled), which costs
a handful of element-wise passes over the tile instead of a sort network.

Per (row, split) the kernel leaves KP keys; torch.topk over their union (B x splits x KP, small)
picks the k best and a tiny kernel decodes them. Small k (KP = next power of two >= k, at most
KP_MAX): every split keeps >= k, nothing can be missed. Large k (AuxK's k_aux = d_in/2,
BatchTopK/threshold widening up to n): LARGE_KS per split over enough splits that the union
holds >= 2k candidates; exact unless a split's whole list lies above the row's k-th key (then
that split may hide more: those rows are re-run with shorter splits, which ends at splits no
longer than their lists).

Every candidate leaves the kernel as one int64 key:
    high 32 bits: the score's float bits made order-preserving as a signed int
                  (flip the low 31 bits of negatives), or INT32_MIN for "not allowed";
    low 32 bits:  the latent index, plus bit 31 = "pre was negative" for AbsTopK.
Sorting keys sorts by score, ties by index, and the key alone decodes back to the value.

Everything else is O(B*k*d): gather-sum (decode forward, grad x), gather-dot (grad of the
decoder values), scatter of outer products (grad W_enc, grad W_dec, grad b_enc), either
with atomics or, in deterministic mode, as ordered segment sums over latent-sorted
entries. All kernels accumulate in fp32 and assume contiguous rows.

Launch configurations come from small pure functions (`encode_configs`, `*_config`) that
`kernels.benchmarks.aot` also calls, so the ahead-of-time compile test covers exactly what can
be launched.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # fixed when the kernels are built

INT32_MIN = tl.constexpr(-(2**31))  # high word of "no candidate" keys
INT32_MAX = tl.constexpr(2**31 - 1)

KP_MIN = 32  # shortest per-row list (fewer binaries: k = 1..32 share one)
KP_MAX = 128  # longest per-row list the fused encode keeps in registers (k above: large-k path)
LARGE_KS = 128  # per-split list length of the large-k path
LARGE_FACTOR = 2  # the large-k path's splits hold >= LARGE_FACTOR * k candidates per row

# Shared memory per block (opt-in maximum), bytes: what a config may use on each target.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
DEFAULT_CC = 90


def smem_limit(cc: int) -> int:
    return SMEM_LIMIT.get(cc, min(SMEM_LIMIT.values()))


# ----------------------------------------------------------------------------------------
# launch-config choice


def _bucket(v: int) -> int:
    """Shape bucket for tuning keys: the next power of two (AuxK's N changes every step)."""
    return triton.next_power_of_2(max(1, int(v)))


def _do_bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25)


class Tuner:
    """Fastest launch config per shape bucket, benchmarked once (kernels tuned this way must
    be idempotent); under the interpreter the first config, so tests stay fast.

    Keys are bucketed by the caller (`encode_tuning_key`), so a run benchmarks each bucket
    once; the cache is an LRU of `max_entries` buckets. `timer(fn) -> ms` is injectable so
    the policy is testable without a GPU; `benchmarks` counts the buckets benchmarked."""

    def __init__(self, kernel, make_configs, *, timer=None, max_entries: int = 512, interpret: bool = INTERPRET):
        self.kernel, self.make_configs = kernel, make_configs
        self.timer = timer or _do_bench
        self.max_entries, self.interpret = max_entries, interpret
        self.cache: OrderedDict = OrderedDict()
        self.benchmarks = 0

    def pick(self, key, run):
        """The config for `key`; `run(cfg)` launches one (used only to benchmark)."""
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        configs = self.make_configs(key)
        if self.interpret or len(configs) == 1:
            choice = configs[0]
        else:
            times, errors = [], []
            for cfg in configs:
                try:
                    times.append(self.timer(lambda cfg=cfg: run(cfg)))
                except Exception as err:  # e.g. out of resources for this tile shape: not a candidate
                    times.append(float("inf"))
                    errors.append(f"{cfg}: {type(err).__name__}: {err}")
            self.benchmarks += 1
            if all(t == float("inf") for t in times):
                raise RuntimeError(f"no launch config of {getattr(self.kernel, '__name__', self.kernel)} runs "
                                   f"for tuning key {key}:\n" + "\n".join(errors))
            choice = configs[min(range(len(configs)), key=times.__getitem__)]
        self.cache[key] = choice
        if len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)
        return choice

    def __call__(self, grid, key, *args, **consts):
        def run(cfg):
            self.kernel[grid(cfg)](*args, **consts, **cfg)

        run(self.pick(key, run))


def _cfg(num_warps=4, num_stages=3, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


# (BLOCK_B, BLOCK_N, BLOCK_D, warps, stages) the encode tuner chooses from on a GPU: tensor-core
# tiles, and one small tile for exact fp32 (TF32 off: FMA, operands in registers).
_ENCODE_TILES = [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
_ENCODE_TILES_FMA = [(32, 64, 16, 8, 2)]


def encode_configs(kp: int, elem_size: int = 2, precision: str = "ieee", cc: int = DEFAULT_CC,
                   interpret: bool = INTERPRET):
    """Tiles for the fused encode at list length KP, operand element size (bytes), precision.

    The running list [BLOCK_B, KP] (value + rank) gets at most 32 entries per thread (more
    warps, then fewer rows, for long lists; BLOCK_B >= 64 so that sm_90 still uses wgmma);
    fp32 operands halve BLOCK_D so the pipelined tiles fit the target's shared memory
    (A100: 163 KiB, H100: 227 KiB per block). The AOT test checks registers, spills, shared
    memory and tensor-core use of every config returned here."""
    if interpret:
        return [_cfg(BLOCK_B=8, BLOCK_N=32, BLOCK_D=32)]
    fma = elem_size == 4 and precision == "ieee"
    configs = []
    for bb, bn, bd, w, s in _ENCODE_TILES_FMA if fma else _ENCODE_TILES:
        if bb * kp > 32 * 32 * w:
            w = 8
            bb = max(64, min(bb, 32 * 32 * w // kp))
        if elem_size > 2 and not fma:
            bd //= 2
        while s > 2 and s * (bb + bn) * bd * elem_size > smem_limit(cc) - 8192:
            s -= 1
        configs.append(_cfg(w, s, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd))
    return list({tuple(sorted(c.items())): c for c in configs}.values())


def encode_tuning_key(dtype, precision, kp, B, N, D, cc=DEFAULT_CC):
    """Bucketed shape key: powers of two for B and N (N is AuxK's dead-latent count), D exact."""
    return (str(dtype), precision, kp, _bucket(B), _bucket(N), D, cc)


def _encode_configs_for_key(key):
    dtype, precision, kp, *_, cc = key
    return encode_configs(kp, 2 if "16" in dtype else 4, precision, cc)


# Fixed launch configs of the other kernels (small tiles under the interpreter, for speed).


def decode_keys_config(interpret: bool = INTERPRET):
    return _cfg(4, 1, BLOCK=64 if interpret else 1024)


def gather_sum_config(D: int, interpret: bool = INTERPRET):
    return _cfg(BLOCK_B=16, BLOCK_D=min(64, triton.next_power_of_2(D))) if interpret else _cfg(BLOCK_B=32, BLOCK_D=128)


def gather_dot_config(K: int, interpret: bool = INTERPRET):
    return _cfg(BLOCK_B=16, BLOCK_K=min(16, triton.next_power_of_2(K)), BLOCK_D=32)


def scatter_atomic_config(D: int, interpret: bool = INTERPRET):
    return _cfg(BLOCK_B=16, BLOCK_D=min(64, triton.next_power_of_2(D))) if interpret else _cfg(8, BLOCK_B=32, BLOCK_D=128)


def scatter_segments_config(D: int, interpret: bool = INTERPRET):
    return _cfg(BLOCK_E=16, BLOCK_D=min(64 if interpret else 128, triton.next_power_of_2(D)))


def matvec_config(D: int, interpret: bool = INTERPRET):
    return _cfg(BLOCK_N=16 if interpret else 32, BLOCK_D=min(64 if interpret else 128, triton.next_power_of_2(D)))


def _launch(kernel, grid, cfg, *args, **consts):
    kernel[grid(cfg) if callable(grid) else grid](*args, **consts, **cfg)


def _empty(shape, dtype, device):
    """Every output buffer comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _capability(device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return DEFAULT_CC


def _split_len(B, n, device, split_len=None):
    """Latents per program: enough (rows x splits) programs to fill the GPU."""
    if split_len is not None:
        return split_len
    if INTERPRET:
        return max(64, triton.cdiv(triton.cdiv(n, 2), 32) * 32)  # 2 splits: the merge is exercised
    programs = triton.cdiv(B, 64)
    splits = max(1, min(triton.cdiv(2 * _num_sms(device), programs), triton.cdiv(n, 2048)))
    return triton.cdiv(triton.cdiv(n, splits), 256) * 256


def large_split_len(n: int, k: int, ks: int = LARGE_KS) -> int:
    """Splits of the large-k path: >= LARGE_FACTOR * k candidates per row in their union, so a
    split holds ~ks / LARGE_FACTOR of a row's top k on average and rarely fills its list."""
    split = max(ks, triton.cdiv(triton.cdiv(n, triton.cdiv(LARGE_FACTOR * k, ks)), ks) * ks)
    return split if triton.cdiv(n, split) * ks >= k else ks


def dot_precision(dtype, tf32: bool) -> str:
    """tl.dot precision for operands of `dtype`: tf32 tensor cores for fp32 unless disabled."""
    return "tf32" if (dtype == torch.float32 and tf32 and not INTERPRET) else "ieee"


# ----------------------------------------------------------------------------------------
# packed keys


@triton.jit
def _float_key(v):
    """int32 whose signed order is the order of the float32 v."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_float(key):
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _decode_keys(keys, use_abs):
    """(value fp32, latent index int64, live) of packed keys."""
    high = (keys >> 32).to(tl.int32)
    low = keys & 0xFFFFFFFF
    score = _key_float(high)
    valid = high != INT32_MIN
    neg = (low >> 31) != 0
    live = valid & ((score > 0) | (use_abs != 0))
    value = tl.where(neg, -score, score)
    return tl.where(live, value, 0.0), low & 0x7FFFFFFF, live


@triton.jit
def _list_score(v, use_abs):
    """Ranking score of running-list values; NaN (a masked latent or an empty slot) ranks lowest."""
    s = tl.where(use_abs != 0, tl.abs(v), v)
    return tl.where(v != v, float("-inf"), s)


# ----------------------------------------------------------------------------------------
# encode forward


# Shapes that change between calls (AuxK's N every step, B, k) are not specialised on, so that
# one binary serves them all (and the AOT test covers what runs); D stays specialised (the
# 16-divisibility of the row stride gives vectorised loads).


@triton.jit(do_not_specialize=["B", "N", "NUM_SPLITS", "USE_ABS", "HAS_MASK"])
def _encode_tiles_kernel(
    xc_ptr, w_ptr, b_ptr, mask_ptr, cand_ptr,
    B, N, D, SPLIT_LEN, NUM_SPLITS, USE_ABS, HAS_MASK,
    KP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block, split): the KP best packed keys of its latent range (unsorted).

    The running list per row is (value, rank): value = the signed pre (NaN for a masked latent
    or an empty slot), rank = the latent index (empty slots -1-slot, below every latent), so
    (score, rank) is a total order. A tile entry enters iff it beats the list's minimum."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    x_rows = xc_ptr + rows.to(tl.int64)[:, None] * D
    lo = pid_s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N)
    slots = tl.arange(0, KP)
    best_v = tl.full([BLOCK_B, KP], float("nan"), tl.float32)
    best_r = tl.zeros([BLOCK_B, KP], tl.int32) - 1 - slots[None, :]
    thr_s = tl.full([BLOCK_B], float("-inf"), tl.float32)  # the list minimum (score, rank)
    thr_r = tl.full([BLOCK_B], -KP, tl.int32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * D
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            xt = tl.load(x_rows + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_rows + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        # NaN marks entries that can never enter: padding rows/columns, and (below) consumed ones
        p = tl.where(row_ok[:, None] & col_ok[None, :], acc + bias[None, :], float("nan"))
        allowed = tl.load(mask_ptr + cols, mask=col_ok & (HAS_MASK != 0), other=1) != 0
        more = tl.max(row_ok.to(tl.int32), axis=0) > 0
        while more:
            s = tl.where(USE_ABS != 0, tl.abs(p), p)
            s = tl.where(allowed[None, :] | (p != p), s, float("-inf"))  # masked: only fills empty slots
            above = (s > thr_s[:, None]) | ((s == thr_s[:, None]) & (cols[None, :] > thr_r[:, None]))
            m = tl.where(above, s, float("-inf"))
            c_s = tl.max(m, axis=1)
            c_i = tl.max(tl.where(above & (m == c_s[:, None]), cols[None, :], -1), axis=1)
            hit = c_i >= 0
            more = tl.max(hit.to(tl.int32), axis=0) > 0
            at = cols[None, :] == c_i[:, None]
            c_v = tl.sum(tl.where(at, p, 0.0), axis=1)
            c_v = tl.where(c_s == float("-inf"), float("nan"), c_v)
            p = tl.where(at, float("nan"), p)
            # replace the list minimum (unique: ranks are distinct) by the extracted entry
            slot = (_list_score(best_v, USE_ABS) == thr_s[:, None]) & (best_r == thr_r[:, None]) & hit[:, None]
            best_v = tl.where(slot, c_v[:, None], best_v)
            best_r = tl.where(slot, c_i[:, None], best_r)
            ls = _list_score(best_v, USE_ABS)
            thr_s = tl.min(ls, axis=1)
            thr_r = tl.min(tl.where(ls == thr_s[:, None], best_r, INT32_MAX), axis=1)
    ls = _list_score(best_v, USE_ABS)
    high = tl.where(ls == float("-inf"), INT32_MIN, _float_key(ls))
    neg = ((best_v < 0) & (USE_ABS != 0)).to(tl.int64) << 31
    keys = (high.to(tl.int64) << 32) | tl.maximum(best_r, 0).to(tl.int64) | neg
    out = cand_ptr + (rows.to(tl.int64)[:, None] * NUM_SPLITS + pid_s) * KP + slots[None, :]
    tl.store(out, keys, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["TOTAL", "USE_ABS"])
def _decode_keys_kernel(keys_ptr, val_ptr, idx_ptr, live_ptr, TOTAL, USE_ABS, BLOCK: tl.constexpr):
    """Element-wise decode of the selected keys."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    value, index, live = _decode_keys(tl.load(keys_ptr + offs, mask=ok, other=0), USE_ABS)
    tl.store(val_ptr + offs, value.to(val_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + offs, index, mask=ok)
    tl.store(live_ptr + offs, live.to(tl.int8), mask=ok)


_ENCODE_TUNER = Tuner(_encode_tiles_kernel, _encode_configs_for_key)


def _tile_candidates(xc, weight, bias, mask, kp, split, use_abs, precision):
    """[B, splits, kp] int64 keys: each split's kp best latents per row (unsorted)."""
    B, D = xc.shape
    N = weight.shape[0]
    num_splits = triton.cdiv(N, split)
    cand = _empty((B, num_splits, kp), torch.int64, xc.device)
    mask_arg = mask if mask is not None else torch.ones(1, dtype=torch.int8, device=xc.device)  # never read
    _ENCODE_TUNER(
        lambda c: (triton.cdiv(B, c["BLOCK_B"]), num_splits),
        encode_tuning_key(xc.dtype, precision, kp, B, N, D, _capability(xc.device)),
        xc, weight, bias, mask_arg, cand, B, N, D, split, num_splits, int(use_abs), int(mask is not None),
        KP=kp, UPCAST=INTERPRET, PRECISION=precision,
    )
    return cand


def _decode(keys, use_abs, out_dtype):
    B, k = keys.shape
    values = _empty((B, k), out_dtype, keys.device)
    indices = _empty((B, k), torch.int64, keys.device)
    live = _empty((B, k), torch.int8, keys.device)
    cfg = decode_keys_config()
    _launch(_decode_keys_kernel, (triton.cdiv(B * k, cfg["BLOCK"]),), cfg,
            keys, values, indices, live, B * k, int(use_abs))
    return values, indices, live.bool()


def _hidden_rows(cand, kth, n, split, ks):
    """Rows whose top k may miss entries: some split with more than ks latents kept a list
    lying wholly above the row's k-th key (its unkept entries could beat that key)."""
    num_splits = cand.shape[1]
    sizes = (n - split * torch.arange(num_splits, device=cand.device)).clamp(max=split)
    return ((cand.amin(2) > kth[:, None]) & (sizes > ks)[None, :]).any(1)


def encode_forward(xc, weight, bias, k, use_abs=False, latent_mask=None, split_len=None,
                   precision="ieee", out_dtype=None):
    """(values [B, k], indices [B, k] int64, live [B, k] bool) of the fused TopK encode.
    xc and weight are the matmul operands (same dtype); values come back in out_dtype.

    The tile kernel leaves KP keys per (row, split); torch.topk over their union picks the k
    best. With k <= KP_MAX every split keeps KP >= k entries, so nothing can be missed. Larger
    k keeps LARGE_KS per split over >= LARGE_FACTOR * k candidates; rows where a split's whole
    list lies above the row's k-th key (it may hide more) are re-run with shorter splits, which
    ends at splits no longer than their lists: exact, with registers bounded for any k."""
    B, D = xc.shape
    N = weight.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be in [1, n_latents={N}]")
    if N >= 2**31:
        raise ValueError("latent indices must fit in 31 bits")
    if xc.dtype != weight.dtype:
        raise ValueError(f"encode operands must share a dtype, got {xc.dtype} and {weight.dtype}")
    mask = latent_mask.to(torch.int8) if latent_mask is not None else None
    if k <= KP_MAX:
        kp = max(KP_MIN, triton.next_power_of_2(k))
        split = _split_len(B, N, xc.device, split_len)
    else:
        kp = LARGE_KS
        split = split_len or large_split_len(N, k, kp)
    keys, todo, rows = None, None, xc
    while True:
        cand = _tile_candidates(rows, weight, bias, mask, kp, split, use_abs, precision)
        top = cand.view(rows.shape[0], -1).topk(k, dim=1, sorted=False).values
        if keys is None:
            keys = top
        else:
            keys[todo] = top
        if kp >= k or split <= kp:
            break
        hidden = _hidden_rows(cand, top.amin(1), N, split, kp).nonzero().squeeze(1)
        if hidden.numel() == 0:
            break
        todo = hidden if todo is None else todo[hidden]
        rows = xc[todo]
        split = max(kp, split // 2)
    return _decode(keys, use_abs, out_dtype or xc.dtype)


# ----------------------------------------------------------------------------------------
# gathers: sum_j v[b, j] * table[idx[b, j]]  and  <vec[b], table[idx[b, j]]>


@triton.jit(do_not_specialize=["B", "K"])
def _gather_sum_kernel(
    idx_ptr, val_ptr, table_ptr, out_ptr, B, K, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    ok = row_ok[:, None] & (ds < D)[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for j in range(0, K):  # fixed order: deterministic
        i = tl.load(idx_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0)
        v = tl.load(val_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0.0).to(tl.float32)
        t = tl.load(table_ptr + i[:, None] * D + ds[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += v[:, None] * t
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _rows_by_columns(out, cfg, block_cols: str):
    """The 2-D grid of the gathers: row blocks x blocks of the output's columns."""
    return triton.cdiv(out.shape[0], cfg["BLOCK_B"]), triton.cdiv(out.shape[1], cfg[block_cols])


def gather_sum(indices, values, table, out_dtype=None):
    B, K = indices.shape
    D = table.shape[1]
    out = _empty((B, D), out_dtype or torch.promote_types(values.dtype, table.dtype), table.device)
    cfg = gather_sum_config(D)
    _launch(_gather_sum_kernel, _rows_by_columns(out, cfg, "BLOCK_D"), cfg, indices, values, table, out, B, K, D)
    return out


@triton.jit(do_not_specialize=["B", "K"])
def _gather_dot_kernel(
    idx_ptr, table_ptr, vec_ptr, out_ptr, B, K, D,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows < B)[:, None] & (js < K)[None, :]
    slot = rows.to(tl.int64)[:, None] * K + js[None, :]
    i = tl.load(idx_ptr + slot, mask=ok, other=0)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        vec = tl.load(vec_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :],
                      mask=(rows < B)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        t = tl.load(table_ptr + i[:, :, None] * D + ds[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(t * vec[:, None, :], axis=2)
    tl.store(out_ptr + slot, acc.to(out_ptr.dtype.element_ty), mask=ok)


def gather_dot(indices, table, vectors, out_dtype=None):
    B, K = indices.shape
    D = table.shape[1]
    out = _empty((B, K), out_dtype or vectors.dtype, vectors.device)
    cfg = gather_dot_config(K)
    _launch(_gather_dot_kernel, _rows_by_columns(out, cfg, "BLOCK_K"), cfg, indices, table, vectors, out, B, K, D)
    return out


# ----------------------------------------------------------------------------------------
# scatter: out[i] = sum over (b, j) with idx[b, j] == i of coef[b, j] * rows[b]
# (grad W_enc with rows = xc, grad W_dec with rows = grad_out), bias_out[i] = sum coef


@triton.jit(do_not_specialize=["B", "K"])
def _scatter_atomic_kernel(
    idx_ptr, coef_ptr, rows_ptr, out_ptr, bias_out_ptr, B, K, D,
    WITH_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    ok = row_ok[:, None] & (ds < D)[None, :]
    r = tl.load(rows_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :], mask=ok, other=0.0).to(tl.float32)
    for j in range(0, K):
        i = tl.load(idx_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0)
        c = tl.load(coef_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0.0).to(tl.float32)
        tl.atomic_add(out_ptr + i[:, None] * D + ds[None, :], c[:, None] * r, mask=ok)
        if WITH_BIAS:
            if tl.program_id(1) == 0:
                tl.atomic_add(bias_out_ptr + i, c, mask=row_ok)


@triton.jit
def _scatter_segments_kernel(
    seg_ptr, tok_ptr, coef_ptr, rows_ptr, out_ptr, bias_out_ptr, D,
    WITH_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One latent per program: sum its entries (sorted by latent, then by token) in a fixed
    order. No atomics, so the result is bitwise reproducible; rows never selected get 0."""
    latent = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(seg_ptr + latent)
    end = tl.load(seg_ptr + latent + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        tok = tl.load(tok_ptr + es, mask=e_ok, other=0)
        c = tl.load(coef_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + tok[:, None] * D + ds[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(c[:, None] * r.to(tl.float32), axis=0)
        csum += c
    tl.store(out_ptr + latent.to(tl.int64) * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    if WITH_BIAS:
        if tl.program_id(1) == 0:
            tl.store(bias_out_ptr + latent, tl.sum(csum, axis=0))


def scatter_outer(indices, coeffs, rows, n_latents, with_bias=False, deterministic=False):
    """(G^T @ rows [n, D] fp32, G^T @ 1 [n] fp32 or None) for G [B, n] with coeffs at indices."""
    B, K = indices.shape
    D = rows.shape[1]
    dev = rows.device
    if deterministic:
        flat = indices.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # ties keep token order
        seg = torch.zeros(n_latents + 1, dtype=torch.int64, device=dev)
        torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=seg[1:])
        tok = torch.div(order, K, rounding_mode="floor")
        coef = coeffs.reshape(-1)[order]
        out = _empty((n_latents, D), torch.float32, dev)
        bias_out = _empty((n_latents,), torch.float32, dev) if with_bias else out
        cfg = scatter_segments_config(D)
        _launch(_scatter_segments_kernel, (n_latents, triton.cdiv(D, cfg["BLOCK_D"])), cfg,
                seg, tok, coef, rows, out, bias_out, D, WITH_BIAS=with_bias)
    else:
        out = torch.zeros((n_latents, D), dtype=torch.float32, device=dev)
        bias_out = torch.zeros((n_latents,), dtype=torch.float32, device=dev) if with_bias else out
        cfg = scatter_atomic_config(D)
        _launch(_scatter_atomic_kernel, (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(D, cfg["BLOCK_D"])), cfg,
                indices, coeffs, rows, out, bias_out, B, K, D, WITH_BIAS=with_bias)
    return out, (bias_out if with_bias else None)


# ----------------------------------------------------------------------------------------
# matvec for grad b_dec = -(grad_b_enc @ W_enc): fixed-order two-level reduction


@triton.jit
def _matvec_kernel(v_ptr, w_ptr, part_ptr, N, D, CHUNK, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_c = tl.program_id(1)
    ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    lo = pid_c * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < hi
        v = tl.load(v_ptr + ns, mask=n_ok, other=0.0)
        w = tl.load(w_ptr + ns.to(tl.int64)[:, None] * D + ds[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    tl.store(part_ptr + pid_c * D + ds, acc, mask=d_ok)


def matvec_chunk(N: int, interpret: bool = INTERPRET) -> int:
    return 64 if interpret else max(1024, triton.cdiv(N, 64))


def vec_mat(v, weight):
    """v [N] fp32 @ weight [N, D] -> [D] fp32, deterministic."""
    N, D = weight.shape
    chunk = matvec_chunk(N)
    n_chunks = triton.cdiv(N, chunk)
    part = _empty((n_chunks, D), torch.float32, weight.device)
    cfg = matvec_config(D)
    _launch(_matvec_kernel, (triton.cdiv(D, cfg["BLOCK_D"]), n_chunks), cfg, v, weight, part, N, D, chunk)
    return part.sum(0)


# ----------------------------------------------------------------------------------------
# autograd


def _c(t):
    return t if t.is_contiguous() else t.contiguous()


def _tf32_default() -> bool:
    return os.environ.get("SPARSEMILL_TF32", "1") != "0"


def _matmul_operands(xc, weight, compute_dtype):
    """The encode matmul's operands in the compute dtype (one cast of W per call when it
    differs from the storage dtype; the fp32 master weights are what backward uses)."""
    dt = compute_dtype or torch.promote_types(xc.dtype, weight.dtype)
    return _c(xc.to(dt)), _c(weight.to(dt))


class TopKEncode(torch.autograd.Function):
    """Fused TopK encode; backward touches only the k selected latents per row.

    The matmul runs in `compute_dtype` (e.g. bf16 under autocast: tensor cores, fp32
    accumulation); selection, values and every gradient use fp32 accumulations of the
    stored (master) tensors."""

    @staticmethod
    def forward(ctx, x, encoder_weight, encoder_bias, b_dec, k, use_abs, latent_mask, deterministic,
                compute_dtype=None, tf32=None):
        xc = _c(x - b_dec)
        w = _c(encoder_weight)
        xm, wm = _matmul_operands(xc, w, compute_dtype)
        precision = dot_precision(xm.dtype, _tf32_default() if tf32 is None else tf32)
        values, idx, live = encode_forward(xm, wm, _c(encoder_bias), k, use_abs, latent_mask,
                                           precision=precision, out_dtype=torch.promote_types(xc.dtype, w.dtype))
        del xm, wm
        ctx.save_for_backward(xc, w, idx, live)
        ctx.deterministic = deterministic
        ctx.dtypes = (x.dtype, encoder_weight.dtype, encoder_bias.dtype, b_dec.dtype)
        ctx.mark_non_differentiable(idx)
        return values, idx

    @staticmethod
    def backward(ctx, grad_values, _grad_idx):
        xc, w, idx, live = ctx.saved_tensors
        grad_x, grad_w, grad_benc, grad_bdec = _encode_backward(ctx, grad_values, xc, w, idx, live)
        return grad_x, grad_w, grad_benc, grad_bdec, None, None, None, None, None, None


def _encode_backward(ctx, grad_values, xc, w, idx, live):
    """Gradients of values = where(live, pre[idx], 0) wrt x, W_enc, b_enc, b_dec (the first
    four inputs of ctx; None where not needed)."""
    g = _c(torch.where(live, grad_values.float(), 0.0))
    need_x, need_w, need_benc, need_bdec = ctx.needs_input_grad[:4]
    grad_x = grad_w = grad_benc = grad_bdec = None
    n = w.shape[0]
    if need_w:
        grad_w, grad_benc = scatter_outer(idx, g, xc, n, with_bias=need_benc or need_bdec,
                                          deterministic=ctx.deterministic)
    elif need_benc or need_bdec:
        grad_benc = scatter_outer(idx, g, g.new_zeros(idx.shape[0], 1), n, with_bias=True,
                                  deterministic=ctx.deterministic)[1]
    if need_x:
        grad_x = gather_sum(idx, g, w, out_dtype=ctx.dtypes[0])
    if need_bdec:
        grad_bdec = (-vec_mat(grad_benc, w)).to(ctx.dtypes[3])
    return (
        grad_x,
        grad_w.to(ctx.dtypes[1]) if grad_w is not None else None,
        grad_benc.to(ctx.dtypes[2]) if need_benc else None,
        grad_bdec,
    )


class EncodeAt(torch.autograd.Function):
    """relu(pre) (or pre with use_abs) at given latent indices, pre = (x - b_dec) @ W^T + b:
    the TopK encode without its selection (g-SAE selects with another score)."""

    @staticmethod
    def forward(ctx, x, encoder_weight, encoder_bias, b_dec, indices, use_abs, deterministic):
        xc = _c(x - b_dec)
        w = _c(encoder_weight)
        idx = _c(indices)
        pre = gather_dot(idx, w, xc, out_dtype=torch.float32) + encoder_bias.float()[idx]
        live = torch.ones_like(pre, dtype=torch.bool) if use_abs else pre > 0
        ctx.save_for_backward(xc, w, idx, live)
        ctx.deterministic = deterministic
        ctx.dtypes = (x.dtype, encoder_weight.dtype, encoder_bias.dtype, b_dec.dtype)
        return torch.where(live, pre, 0.0).to(torch.promote_types(xc.dtype, w.dtype))

    @staticmethod
    def backward(ctx, grad_values):
        xc, w, idx, live = ctx.saved_tensors
        return (*_encode_backward(ctx, grad_values, xc, w, idx, live), None, None, None)


class SparseDecode(torch.autograd.Function):
    """x_hat = sum_j values[:, j] * W_dec[indices[:, j]] (no bias)."""

    @staticmethod
    def forward(ctx, values, indices, decoder_weight, deterministic):
        values, indices, w = _c(values), _c(indices), _c(decoder_weight)
        ctx.save_for_backward(values, indices, w)
        ctx.deterministic = deterministic
        return gather_sum(indices, values, w)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, w = ctx.saved_tensors
        grad_out = _c(grad_out)
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(indices, w, grad_out, out_dtype=values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = scatter_outer(indices, values, grad_out, w.shape[0], deterministic=ctx.deterministic)[0]
            grad_w = grad_w.to(w.dtype)
        return grad_values, None, grad_w, None


def topk_encode(x, encoder_weight, encoder_bias, b_dec, k, *, use_abs=False, latent_mask=None, deterministic=False,
                compute_dtype=None, tf32=None):
    """compute_dtype: the matmul operands' dtype (None: the inputs' own); tf32: use TF32 tensor
    cores for fp32 operands (None: env SPARSEMILL_TF32, default on)."""
    return TopKEncode.apply(x, encoder_weight, encoder_bias, b_dec, k, use_abs, latent_mask, deterministic,
                            compute_dtype, tf32)


def encode_at(x, encoder_weight, encoder_bias, b_dec, indices, *, use_abs=False, deterministic=False):
    return EncodeAt.apply(x, encoder_weight, encoder_bias, b_dec, indices, use_abs, deterministic)


def sparse_decode(values, indices, decoder_weight, *, deterministic=False):
    return SparseDecode.apply(values, indices, decoder_weight, deterministic)
