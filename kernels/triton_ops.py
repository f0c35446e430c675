"""Triton kernels for the SAE's sparse math, same semantics and signatures as kernels.reference.

Encode forward (the only O(B*n*d) part) is one fused kernel: each program owns a block of
rows and a range of latents, computes pre = xc @ W_enc^T + b_enc one [rows x latents] tile
at a time and keeps a running top-k in registers, so nothing of size B x n is ever written.
Latent ranges ("splits") give the GPU enough programs when B is small; a second tiny
kernel merges the per-split candidates (B x splits x k).

tl.topk / tl.sort sort values only, so each candidate is one int64 key:
    high 32 bits: the score's float bits made order-preserving as a signed int
                  (flip the low 31 bits of negatives), or INT32_MIN for "not allowed";
    low 32 bits:  the latent index, plus bit 31 = "pre was negative" for AbsTopK.
Sorting keys sorts by score, ties by index, and the key alone decodes back to the value.

Everything else is O(B*k*d): gather-sum (decode forward, grad x), gather-dot (grad of the
decoder values), scatter of outer products (grad W_enc, grad W_dec, grad b_enc), either
with atomics or, in deterministic mode, as ordered segment sums over latent-sorted
entries. Math is fp32 whatever the storage dtype. All kernels assume contiguous rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # fixed when the kernels are built

INT32_MIN = tl.constexpr(-(2**31))  # high word of "no candidate" keys


# ----------------------------------------------------------------------------------------
# launch-config choice


class _Tuner:
    """Fastest config per shape key, benchmarked once on the GPU (kernels tuned this way
    must be idempotent); under the interpreter the first config, so tests stay fast."""

    def __init__(self, kernel, make_configs):
        self.kernel, self.make_configs, self.cache = kernel, make_configs, {}

    def __call__(self, grid, key, *args, **consts):
        if key not in self.cache:
            configs = self.make_configs(key)
            if INTERPRET or len(configs) == 1:
                self.cache[key] = configs[0]
            else:
                self.cache[key] = min(configs, key=lambda c: self._time(grid, c, args, consts))
        self._launch(grid, self.cache[key], args, consts)

    def _launch(self, grid, cfg, args, consts):
        self.kernel[grid(cfg)](*args, **consts, **cfg)

    def _time(self, grid, cfg, args, consts):
        try:
            return triton.testing.do_bench(lambda: self._launch(grid, cfg, args, consts), warmup=5, rep=25)
        except Exception:  # e.g. out of shared memory for this tile shape: not a candidate
            return float("inf")


def _cfg(num_warps=4, num_stages=2, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


def _encode_configs(key):
    """Tiles for the fused encode. BLOCK_N >= KP: a tile is reduced to its own top-KP."""
    kp = key[-1]
    if INTERPRET:
        return [_cfg(BLOCK_B=8, BLOCK_N=max(32, kp), BLOCK_D=32)]
    configs = []
    for bb, bn, bd, w, s in [
        (64, 64, 64, 4, 3), (64, 128, 32, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
        (128, 128, 32, 8, 3), (32, 128, 64, 4, 3), (64, 256, 32, 8, 2),
    ]:
        bn = max(bn, kp)
        bb = min(bb, max(16, 16384 // bn))  # keep the [rows x latents] tile in registers
        configs.append(_cfg(w, s, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd))
    return list({tuple(sorted(c.items())): c for c in configs}.values())


def _empty(shape, dtype, device):
    """Every output buffer comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _split_len(B, n, device, split_len=None):
    """Latents per program: enough (rows x splits) programs to fill the GPU."""
    if split_len is not None:
        return split_len
    if INTERPRET:
        return max(64, triton.cdiv(triton.cdiv(n, 2), 32) * 32)  # 2 splits: the merge is exercised
    programs = triton.cdiv(B, 64)
    splits = max(1, min(triton.cdiv(2 * _num_sms(device), programs), triton.cdiv(n, 2048)))
    return triton.cdiv(triton.cdiv(n, splits), 256) * 256


def _dot_precision(dtype):
    return "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"


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
def _merge_sorted(best, cand):
    """Top-KP of two descending [rows, KP] key lists, descending. max(a, reversed b) holds
    the KP largest of the union as a bitonic sequence; one bitonic merge sorts it."""
    return tl.bitonic_merge(tl.maximum(best, tl.flip(cand, 1)), descending=True)


# ----------------------------------------------------------------------------------------
# encode forward


@triton.jit
def _encode_tiles_kernel(
    xc_ptr, w_ptr, b_ptr, mask_ptr, cand_ptr,
    B, N, D, SPLIT_LEN, NUM_SPLITS,
    KP: tl.constexpr, USE_ABS: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block, split): the KP best packed keys of its latent range, sorted."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    x_rows = xc_ptr + rows.to(tl.int64)[:, None] * D
    lo = pid_s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N)
    none = tl.full([BLOCK_B, BLOCK_N], INT32_MIN, tl.int64) << 32  # "no candidate", index 0
    best = tl.full([BLOCK_B, KP], INT32_MIN, tl.int64) << 32
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
        pre = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        low = cols.to(tl.int64)[None, :] + tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.int64)
        if USE_ABS:
            score = tl.abs(pre)
            low += (pre < 0).to(tl.int64) << 31
        else:
            score = pre
        keys = (_float_key(score).to(tl.int64) << 32) | low
        if HAS_MASK:
            # a masked latent ranks below every allowed one but keeps its index, so the
            # inert slots of a row with fewer than k allowed latents stay distinct
            allowed = col_ok & (tl.load(mask_ptr + cols, mask=col_ok, other=0) != 0)
            keys = tl.where(allowed[None, :], keys, tl.where(col_ok[None, :], none | low, none))
        else:
            keys = tl.where(col_ok[None, :], keys, none)
        if BLOCK_N > KP:
            tile = tl.topk(keys, KP, dim=1)
        else:
            tile = tl.sort(keys, dim=1, descending=True)
        best = _merge_sorted(best, tile)
    kcols = tl.arange(0, KP)
    out = cand_ptr + (rows.to(tl.int64)[:, None] * NUM_SPLITS + pid_s) * KP + kcols[None, :]
    tl.store(out, best, mask=row_ok[:, None])


@triton.jit
def _encode_merge_kernel(
    cand_ptr, val_ptr, idx_ptr, live_ptr, B, NUM_SPLITS, K,
    KP: tl.constexpr, USE_ABS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Merge the per-split candidates and decode the k best keys to value, index, live."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    kcols = tl.arange(0, KP)
    base = cand_ptr + rows.to(tl.int64)[:, None] * NUM_SPLITS * KP + kcols[None, :]
    best = tl.load(base, mask=row_ok[:, None], other=0)
    for s in range(1, NUM_SPLITS):
        best = _merge_sorted(best, tl.load(base + s * KP, mask=row_ok[:, None], other=0))
    high = (best >> 32).to(tl.int32)
    low = best - (high.to(tl.int64) << 32)
    score = _key_float(high)
    valid = high != INT32_MIN
    if USE_ABS:
        value = tl.where((low >> 31) != 0, -score, score)
        live = valid
    else:
        value = score
        live = valid & (score > 0)
    value = tl.where(live, value, 0.0)
    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    ok = row_ok[:, None] & (kcols < K)[None, :]
    tl.store(val_ptr + out, value.to(val_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + out, low & 0x7FFFFFFF, mask=ok)
    tl.store(live_ptr + out, live.to(tl.int8), mask=ok)


_ENCODE_TUNER = _Tuner(_encode_tiles_kernel, _encode_configs)


def encode_forward(xc, weight, bias, k, use_abs=False, latent_mask=None, split_len=None):
    """(values [B, k], indices [B, k] int64, live [B, k] bool) of the fused TopK encode."""
    B, D = xc.shape
    N = weight.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be in [1, n_latents={N}]")
    if N >= 2**31:
        raise ValueError("latent indices must fit in 31 bits")
    kp = triton.next_power_of_2(k)
    split = _split_len(B, N, xc.device, split_len)
    num_splits = triton.cdiv(N, split)
    cand = _empty((B, num_splits, kp), torch.int64, xc.device)
    mask = latent_mask.to(torch.int8) if latent_mask is not None else bias  # dummy pointer
    upcast = INTERPRET or xc.dtype != weight.dtype or xc.dtype not in (torch.float16, torch.bfloat16)
    _ENCODE_TUNER(
        lambda c: (triton.cdiv(B, c["BLOCK_B"]), num_splits),
        (xc.dtype, weight.dtype, triton.next_power_of_2(B), N, D, use_abs, kp),
        xc, weight, bias, mask, cand, B, N, D, split, num_splits,
        KP=kp, USE_ABS=use_abs, HAS_MASK=latent_mask is not None, UPCAST=upcast,
        PRECISION=_dot_precision(xc.dtype) if not INTERPRET else "ieee",
    )
    values = _empty((B, k), torch.promote_types(xc.dtype, weight.dtype), xc.device)
    indices = _empty((B, k), torch.int64, xc.device)
    live = _empty((B, k), torch.int8, xc.device)
    block_b = max(1, min(64, 4096 // kp))
    _encode_merge_kernel[(triton.cdiv(B, block_b),)](
        cand, values, indices, live, B, num_splits, k, KP=kp, USE_ABS=use_abs, BLOCK_B=block_b
    )
    return values, indices, live.bool()


# ----------------------------------------------------------------------------------------
# gathers: sum_j v[b, j] * table[idx[b, j]]  and  <vec[b], table[idx[b, j]]>


@triton.jit
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


def gather_sum(indices, values, table, out_dtype=None):
    B, K = indices.shape
    D = table.shape[1]
    out = _empty((B, D), out_dtype or torch.promote_types(values.dtype, table.dtype), table.device)
    block_b, block_d = (16, min(64, triton.next_power_of_2(D))) if INTERPRET else (32, 128)
    grid = (triton.cdiv(B, block_b), triton.cdiv(D, block_d))
    _gather_sum_kernel[grid](indices, values, table, out, B, K, D, BLOCK_B=block_b, BLOCK_D=block_d)
    return out


@triton.jit
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
    block_k = min(16, triton.next_power_of_2(K))
    block_b, block_d = (16, 32) if INTERPRET else (16, 64)
    grid = (triton.cdiv(B, block_b), triton.cdiv(K, block_k))
    _gather_dot_kernel[grid](indices, table, vectors, out, B, K, D, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d)
    return out


# ----------------------------------------------------------------------------------------
# scatter: out[i] = sum over (b, j) with idx[b, j] == i of coef[b, j] * rows[b]
# (grad W_enc with rows = xc, grad W_dec with rows = grad_out), bias_out[i] = sum coef


@triton.jit
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
        block_d = min(128, triton.next_power_of_2(D)) if not INTERPRET else min(64, triton.next_power_of_2(D))
        grid = (n_latents, triton.cdiv(D, block_d))
        _scatter_segments_kernel[grid](
            seg, tok, coef, rows, out, bias_out, D, WITH_BIAS=with_bias, BLOCK_E=16, BLOCK_D=block_d
        )
    else:
        out = torch.zeros((n_latents, D), dtype=torch.float32, device=dev)
        bias_out = torch.zeros((n_latents,), dtype=torch.float32, device=dev) if with_bias else out
        block_b, block_d = (16, min(64, triton.next_power_of_2(D))) if INTERPRET else (32, 128)
        grid = (triton.cdiv(B, block_b), triton.cdiv(D, block_d))
        _scatter_atomic_kernel[grid](
            indices, coeffs, rows, out, bias_out, B, K, D, WITH_BIAS=with_bias, BLOCK_B=block_b, BLOCK_D=block_d
        )
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


def vec_mat(v, weight):
    """v [N] fp32 @ weight [N, D] -> [D] fp32, deterministic."""
    N, D = weight.shape
    chunk = max(1024, triton.cdiv(N, 64)) if not INTERPRET else 64
    n_chunks = triton.cdiv(N, chunk)
    part = _empty((n_chunks, D), torch.float32, weight.device)
    block_d = min(128, triton.next_power_of_2(D)) if not INTERPRET else min(64, triton.next_power_of_2(D))
    block_n = 32 if not INTERPRET else 16
    _matvec_kernel[(triton.cdiv(D, block_d), n_chunks)](v, weight, part, N, D, chunk, BLOCK_N=block_n, BLOCK_D=block_d)
    return part.sum(0)


# ----------------------------------------------------------------------------------------
# autograd


def _c(t):
    return t if t.is_contiguous() else t.contiguous()


class TopKEncode(torch.autograd.Function):
    """Fused TopK encode; backward touches only the k selected latents per row."""

    @staticmethod
    def forward(ctx, x, encoder_weight, encoder_bias, b_dec, k, use_abs, latent_mask, deterministic):
        xc = _c(x - b_dec)
        w = _c(encoder_weight)
        values, idx, live = encode_forward(xc, w, _c(encoder_bias), k, use_abs, latent_mask)
        ctx.save_for_backward(xc, w, idx, live)
        ctx.deterministic = deterministic
        ctx.dtypes = (x.dtype, encoder_weight.dtype, encoder_bias.dtype, b_dec.dtype)
        ctx.mark_non_differentiable(idx)
        return values, idx

    @staticmethod
    def backward(ctx, grad_values, _grad_idx):
        xc, w, idx, live = ctx.saved_tensors
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
            grad_bdec, None, None, None, None,
        )


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


def topk_encode(x, encoder_weight, encoder_bias, b_dec, k, *, use_abs=False, latent_mask=None, deterministic=False):
    return TopKEncode.apply(x, encoder_weight, encoder_bias, b_dec, k, use_abs, latent_mask, deterministic)


def sparse_decode(values, indices, decoder_weight, *, deterministic=False):
    return SparseDecode.apply(values, indices, decoder_weight, deterministic)
