"""PyTorch implementation of the SAE's sparse math: TopK encode and sparse decode.

This is the semantics every backend must reproduce, the path used on CPUs, and the
reference the Triton kernels are tested against.

Shapes (layouts chosen so that every hot access is a contiguous row):
    x              [B, d_in]
    encoder_weight [n_latents, d_in]   (SAELens' W_enc transposed)
    encoder_bias   [n_latents]
    b_dec          [d_in]              (subtracted from x before encoding)
    decoder_weight [n_latents, d_out]  (SAELens' W_dec)
    values/indices [B, k]

Memory stays O(B * k + tile): pre-activations are computed one [rows x chunk] tile at a
time with a running top-k, and the backward only touches the k selected latents per token.

CPU speed: the encoder's matmul is the floor, so everything else is kept small next to it.
The tile is sized to stay in the last-level cache and its buffer is reused (no page faults
on fresh allocations); after the first tile of a row block only the entries that beat the
running k-th best are looked at, which is much cheaper than a torch.topk over every tile;
the backward's sparse products run as CSR sparse x dense kernels on CPU.
"""

from __future__ import annotations

import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_LATENT_CHUNK = 4096
_TILE_ELEMS = 1 << 22  # rows x chunk of one pre-activation tile: 16 MiB in fp32, fits L3
_BATCH_CHUNK_ELEMS = 1 << 18  # bound on B_chunk * k * d temporaries (non-CPU fallback)
_CSR_DTYPES = (torch.float32, torch.float64)  # what the CPU sparse kernels implement
_CSR_MIN_WORK = 1 << 20  # B*k*d below which the plain loops win (no sparse-kernel setup)
# k / (latents hit) above which each product of a selection runs densely over the hit latents
# (HitLatents). Measured at d=512, B=4096, k=256 (AuxK) on a 2-core Xeon: the dense products'
# cost grows with the latents hit, the sparse kernels' does not; these are the break-evens.
_DENSE_OVER_HITS = {"scatter_outer": 1 / 16, "gather_dot": 1 / 32, "gather_sum": 1 / 10}
_DENSE_SCATTER_ELEMS = 1 << 24  # bound on the dense [rows, latents hit] block (64 MiB fp32)

_EXT_ROWS, _EXT_CHUNK = 512, 1024  # rows x latents of a fused CPU selection tile (2 MiB fp32: in L2)
# rows x aux latents gathered per fused task (64 MiB fp32): fewer rows a task slowed the tiles'
# GEMMs (at n=65536 with 10% dead, 320 rows instead of 512 doubled AuxK's share of the encode)
_EXT_AUX_ELEMS = 1 << 24

_scratch_buffers = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer reused across calls: a fresh 16 MiB tile costs thousands of page
    faults per forward on CPU, more than the top-k work on it."""
    cache = _scratch_buffers.__dict__
    key = (name, dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _score(pre: torch.Tensor, use_abs: bool) -> torch.Tensor:
    return pre.abs() if use_abs else pre


def _merge_topk(best, score, pre, offset, k):
    """Merge one tile's candidates into the running (score, pre, index) triple of the k best
    (pre is None while it equals score, i.e. without use_abs).

    Once a row holds k finite scores, only tile entries above its k-th best can enter, and
    after the first tile there are few of them: they are found by `_above` and packed into a
    small [rows, width] candidate block instead of running topk over the whole tile.
    """
    rows, width = score.shape
    if best is not None and best[0].shape[1] == k:
        thr = best[0].amin(dim=1, keepdim=True)
        if bool(torch.isfinite(thr).all()):
            r, flat = _above(score, thr)
            if r.numel() == 0:
                return best
            counts = torch.bincount(r, minlength=rows)
            w = int(counts.max())
            dest = r * w + torch.arange(r.numel(), device=r.device) - (counts.cumsum(0) - counts)[r]

            def pack(src, fill):
                out = src.new_full((rows * w,), fill)
                return out.index_copy_(0, dest, src).view(rows, w)

            cand = (
                pack(score.take(flat), float("-inf")),
                None if pre is None else pack(pre.take(flat), 0.0),
                pack(flat - r * width + offset, 0),
            )
            return _keep_topk(_cat(best, cand), k)
    cand_score, c = score.topk(min(k, width), dim=1, sorted=False)
    cand = (cand_score, None if pre is None else pre.gather(1, c), c + offset)
    return cand if best is None else _keep_topk(_cat(best, cand), k)


def _cat(a, b):
    return tuple(None if x is None else torch.cat([x, y], 1) for x, y in zip(a, b))


_GROUP = 4


def _above(score, thr):
    """(rows, flat indices) of the entries of score above their row's thr, rows ascending.

    Filtering G-strided column groups by their max first (one vectorised amax pass) leaves
    the comparison and the nonzero to G times fewer elements; only the few groups that can
    hold a survivor are then looked at element by element."""
    rows, width = score.shape
    if width % _GROUP:
        r, c = (score > thr).nonzero(as_tuple=True)
        return r, r * width + c
    span = width // _GROUP
    gmax = score.view(rows, _GROUP, span).amax(1)  # group j = columns {j, j + span, ...}
    r, j = (gmax > thr).nonzero(as_tuple=True)
    flat = (r * width + j).unsqueeze(1) + span * torch.arange(_GROUP, device=r.device)
    pos, g = (score.take(flat) > thr[r]).nonzero(as_tuple=True)
    return r[pos], flat[pos, g]


def _keep_topk(best, k):
    score, pre, idx = best
    if score.shape[1] <= k:
        return best
    score, pos = score.topk(k, dim=1, sorted=False)
    return score, None if pre is None else pre.gather(1, pos), idx.gather(1, pos)


class Selection(NamedTuple):
    """The k best latents per row; with an AuxK request also the k_aux best among its latents."""

    pre: torch.Tensor  # [B, k] pre-activations
    indices: torch.Tensor  # [B, k] latent ids
    valid: torch.Tensor  # [B, k]: False where fewer than k latents were allowed
    aux_pre: torch.Tensor | None = None  # [B, k_aux]
    aux_indices: torch.Tensor | None = None  # [B, k_aux], among the requested latents


@torch.no_grad()
def select_topk(
    x_centered: torch.Tensor,
    encoder_weight: torch.Tensor,
    encoder_bias: torch.Tensor,
    k: int,
    use_abs: bool = False,
    latent_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LATENT_CHUNK,
    aux: tuple[torch.Tensor, int] | None = None,
) -> Selection:
    """Pre-activations and indices of the k best latents per row, plus a validity mask.

    The best latents maximise `pre` (or `|pre|` with use_abs) among latents allowed by
    `latent_mask`. `aux` = (ascending latent ids, k_aux <= their count): also the k_aux best
    among those (AuxK's dead latents; latent_mask does not apply), from the same tiles when the
    fused CPU selection runs, else from a second pass over their encoder rows.
    """
    B, n = x_centered.shape[0], encoder_weight.shape[0]
    bias = encoder_bias
    if latent_mask is not None and not use_abs:
        bias = encoder_bias.masked_fill(~latent_mask, float("-inf"))  # can never be selected
    aux_ids, k_aux = aux if aux is not None else (None, 0)
    if aux is not None:
        _check_aux(aux_ids, k_aux, n)
    fused = _fused_cpu_selection(x_centered, encoder_weight, bias, k)
    # AuxK's latents ride on the fused tiles unless a masked bias would hide some of them
    fuse_aux = aux is not None and fused is not None and (latent_mask is None or use_abs)
    if fused is not None:
        main = _select_fused(fused, x_centered, encoder_weight, bias, k, use_abs, latent_mask if use_abs else None,
                             aux if fuse_aux else None)
    else:
        main = _select_topk_tiles(x_centered, encoder_weight, bias, k, use_abs, latent_mask, chunk_size)
    if aux is None or fuse_aux:
        return main
    sub = select_topk(x_centered, encoder_weight[aux_ids], encoder_bias[aux_ids], k_aux, use_abs,
                      chunk_size=chunk_size)
    return main._replace(aux_pre=sub.pre, aux_indices=aux_ids[sub.indices])


def _select_fused(ext, x_centered, encoder_weight, bias, k, use_abs, abs_mask, aux) -> Selection:
    """kernels/cpu_topk.cpp's selection (with `aux`, AuxK's from the same tiles)."""
    B = x_centered.shape[0]
    rows_per_task = max(1, min(_EXT_ROWS, -(-B // (2 * torch.get_num_threads()))))  # >= 2 tasks a thread
    aux_ids, k_aux = aux if aux is not None else (None, 0)
    if aux is not None:  # bound the per-task buffer of the aux latents' pre-activations
        rows_per_task = max(1, min(rows_per_task, _EXT_AUX_ELEMS // aux_ids.numel()))
        aux_ids = aux_ids.contiguous()
    pre, idx, score, aux_pre, aux_idx = ext.select_topk(
        *(t.detach().contiguous() for t in (x_centered, encoder_weight, bias)), k, use_abs, abs_mask, _EXT_CHUNK,
        rows_per_task, aux_ids, k_aux)
    main = Selection(pre, idx, torch.isfinite(score))
    return main if aux is None else main._replace(aux_pre=aux_pre, aux_indices=aux_idx)


def _check_aux(aux_ids: torch.Tensor, k_aux: int, n: int) -> None:
    if aux_ids.dtype != torch.int64 or aux_ids.dim() != 1 or not 1 <= k_aux <= aux_ids.numel():
        raise ValueError(f"aux selection: want 1-d int64 latent ids and 1 <= k_aux <= their count, got "
                         f"{aux_ids.dtype} ids of shape {tuple(aux_ids.shape)} and k_aux={k_aux}")
    if bool((aux_ids[1:] <= aux_ids[:-1]).any()) or int(aux_ids[0]) < 0 or int(aux_ids[-1]) >= n:
        raise ValueError(f"aux selection: latent ids must be distinct, ascending and in [0, {n})")


def _select_topk_tiles(x_centered, encoder_weight, bias, k, use_abs, latent_mask, chunk_size) -> Selection:
    """The PyTorch selection: a running top-k over [rows x chunk] tiles (see _merge_topk)."""
    B, n = x_centered.shape[0], encoder_weight.shape[0]
    chunk = max(1, min(chunk_size, n))
    block = max(1, min(B, _TILE_ELEMS // chunk))
    dtype = torch.promote_types(x_centered.dtype, encoder_weight.dtype)
    pre_buf = _scratch("pre", block * chunk, dtype, x_centered.device)
    abs_buf = _scratch("abs", block * chunk, dtype, x_centered.device) if use_abs else None
    blocks = []
    for r0 in range(0, B, block):
        xb = x_centered[r0 : r0 + block]
        rows = xb.shape[0]
        best = None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            pre = pre_buf[: rows * (end - start)].view(rows, end - start)
            torch.addmm(bias[start:end], xb, encoder_weight[start:end].T, out=pre)
            score = pre
            if use_abs:
                score = torch.abs(pre, out=abs_buf[: pre.numel()].view_as(pre))
                if latent_mask is not None:
                    score.masked_fill_(~latent_mask[start:end], float("-inf"))
            best = _merge_topk(best, score, pre if use_abs else None, start, k)
        blocks.append(best)
    best_score, best_pre, best_idx = (
        None if parts[0] is None else torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*blocks)
    )
    if best_pre is None:
        best_pre = best_score
    return Selection(best_pre, best_idx, torch.isfinite(best_score))


def _cpu_kernels(*tensors):
    """The C++ CPU kernels (kernels/cpu_*.cpp) when every tensor is float32 on the CPU and they
    are built, else None."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return None
    from kernels import cpu_ext  # noqa: PLC0415 (`python -m kernels.cpu_ext` must find it unimported)

    return cpu_ext.load()


def _fused_cpu_selection(x_centered, encoder_weight, bias, k):
    """kernels/cpu_topk.cpp when it applies (CPU, float32, k <= n) and is built, else None."""
    if not (1 <= k <= encoder_weight.shape[0] and x_centered.shape[0] > 0):
        return None
    return _cpu_kernels(x_centered, encoder_weight, bias)


def _cpu_sparse_products(*tensors):
    """kernels/cpu_sparse.cpp's backward products for these tensors, or None (see _cpu_kernels)."""
    return _cpu_kernels(*tensors)


def _activation_mask(pre: torch.Tensor, valid: torch.Tensor, use_abs: bool) -> torch.Tensor:
    """Where the selected value is passed through (and so carries gradient)."""
    return valid if use_abs else valid & (pre > 0)


def _rows_of_batch(total_rows: int, per_row_elems: int):
    step = max(1, _BATCH_CHUNK_ELEMS // max(per_row_elems, 1))
    for start in range(0, total_rows, step):
        yield slice(start, min(start + step, total_rows))


def _use_csr(t: torch.Tensor, work: int) -> bool:
    return t.device.type == "cpu" and work >= _CSR_MIN_WORK


def _csr_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in _CSR_DTYPES else torch.float32


def _csr(crow, col, values, size):
    with warnings.catch_warnings():  # torch warns that CSR is "beta" on first use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class HitLatents(NamedTuple):
    """The latents a [B, k] selection hits, when it is dense over them (AuxK: 256 of ~1.7k dead
    latents per token): products over those columns then run as dense matmuls, >= 25x more
    multiply-adds per second than the gathers and CSR kernels, which degrade further with many
    non-zeros per row (a dense product over the hit latents was 3-7x faster at AuxK's shapes)."""

    ids: torch.Tensor  # [h] ascending latent ids
    local: torch.Tensor  # [B, k]: each selected latent's column among them

    @staticmethod
    def of(indices: torch.Tensor, n_latents: int, op: str) -> "HitLatents | None":
        """The layout if dense enough for `op` (k >= _DENSE_OVER_HITS[op] * hit latents), else None."""
        ids = torch.bincount(indices.reshape(-1), minlength=n_latents).nonzero().squeeze(1)
        if indices.shape[1] < _DENSE_OVER_HITS[op] * ids.numel():
            return None
        position = torch.empty(n_latents, dtype=torch.int64, device=indices.device)
        position[ids] = torch.arange(ids.numel(), device=indices.device)
        return HitLatents(ids, position[indices])

    def row_blocks(self):
        """Row slices whose dense [rows, hit] block stays within _DENSE_SCATTER_ELEMS."""
        B, step = self.local.shape[0], max(1, _DENSE_SCATTER_ELEMS // max(self.ids.numel(), 1))
        return (slice(r0, min(r0 + step, B)) for r0 in range(0, B, step))

    def dense(self, rows: slice, coeffs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The selection's [rows, hit] block with `coeffs` at its entries (summed where repeated)."""
        block = torch.zeros(rows.stop - rows.start, self.ids.numel(), dtype=dtype, device=coeffs.device)
        return block.scatter_add_(1, self.local[rows], coeffs[rows].to(dtype))


def scatter_outer(
    indices: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, n_latents: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_b sum_j coeffs[b, j] * rows[b] added at latent indices[b, j]: G^T @ rows with
    G sparse [B, n_latents] (k non-zeros per row). Cost B*k*d, never B*n. With `out` (an
    earlier [n_latents, d] result, e.g. TopK's when this is AuxK's), the sum is added into it."""
    B, k = indices.shape
    d = rows.shape[1]
    hits = HitLatents.of(indices, n_latents, "scatter_outer")
    if hits is not None:
        return _scatter_outer_dense(hits, coeffs, rows, n_latents, out)
    if out is not None:
        return out.add_(scatter_outer(indices, coeffs, rows, n_latents))
    ext = _cpu_sparse_products(coeffs, rows)
    if ext is not None:
        return ext.scatter_outer(indices.contiguous(), coeffs.contiguous(), rows.contiguous(), n_latents)
    if _use_csr(rows, B * k * d):
        # G^T in CSR: its rows are latents, so sort the (token, slot) pairs by latent.
        dt = _csr_dtype(rows)
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        crow = torch.zeros(n_latents + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=crow[1:])
        gt = _csr(crow, order // k, coeffs.reshape(-1)[order].to(dt), (n_latents, B))
        out = torch.empty(n_latents, d, dtype=dt)
        with torch.autocast("cpu", enabled=False):
            # beta=0: `out` is only written (no zero fill, no copy from a column-major result)
            torch.addmm(out, gt, rows.to(dt), beta=0.0, out=out)
        return out.to(rows.dtype)
    out = rows.new_zeros(n_latents, d)
    for sl in _rows_of_batch(B, k * d):
        contrib = coeffs[sl].unsqueeze(2) * rows[sl].unsqueeze(1)  # [b, k, d]
        out.index_add_(0, indices[sl].reshape(-1), contrib.reshape(-1, d))
    return out


def _scatter_outer_dense(hits: HitLatents, coeffs, rows, n_latents, out=None):
    """scatter_outer as G_hit^T @ rows with G_hit the dense [B, |hit|] block of G's hit columns."""
    acc = rows.new_zeros(hits.ids.numel(), rows.shape[1])
    with torch.autocast(rows.device.type, enabled=False):
        for sl in hits.row_blocks():
            acc.addmm_(hits.dense(sl, coeffs, rows.dtype).T, rows[sl])
    if out is not None:
        return out.index_add_(0, hits.ids, acc.to(out.dtype))
    if hits.ids.numel() == n_latents:
        return acc
    return rows.new_zeros(n_latents, rows.shape[1]).index_copy_(0, hits.ids, acc)


def gather_dot(indices: torch.Tensor, table: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """out[b, j] = <vectors[b], table[indices[b, j]]>: (vectors @ table^T) sampled at the
    k selected entries per row, never the dense product over all latents."""
    B, k = indices.shape
    hits = HitLatents.of(indices, table.shape[0], "gather_dot")
    if hits is not None:
        out = vectors.new_empty(indices.shape)
        sub = table[hits.ids].to(vectors.dtype)
        with torch.autocast(vectors.device.type, enabled=False):
            for sl in hits.row_blocks():
                out[sl] = (vectors[sl] @ sub.T).gather(1, hits.local[sl])
        return out
    ext = _cpu_sparse_products(table, vectors)
    if ext is not None:
        return ext.gather_dot(indices.contiguous(), table.contiguous(), vectors.contiguous())
    if _use_csr(vectors, B * k * table.shape[1]):
        dt = _csr_dtype(vectors)
        cols, perm = indices.sort(dim=1)  # CSR wants sorted columns within a row
        crow = torch.arange(0, B * k + 1, k)
        pattern = _csr(crow, cols.reshape(-1), torch.zeros(B * k, dtype=dt), (B, table.shape[0]))
        with torch.autocast("cpu", enabled=False):
            dots = torch.sparse.sampled_addmm(pattern, vectors.to(dt), table.to(dt).T, beta=0.0)
        dots = dots.values().view(B, k).to(vectors.dtype)
        return torch.empty_like(dots).scatter_(1, perm, dots)
    out = vectors.new_empty(indices.shape)
    for sl in _rows_of_batch(B, k * table.shape[1]):
        out[sl] = torch.bmm(table[indices[sl]], vectors[sl].unsqueeze(2)).squeeze(2)
    return out


def gather_sum(indices: torch.Tensor, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_j values[b, j] * table[indices[b, j]] (an embedding bag, in the table's
    dtype: e.g. bf16 values from an autocast region with fp32 weights)."""
    hits = HitLatents.of(indices, table.shape[0], "gather_sum")
    if hits is None:
        return F.embedding_bag(indices, table, per_sample_weights=values.to(table.dtype), mode="sum")
    out = table.new_empty(indices.shape[0], table.shape[1])
    sub = table[hits.ids]
    with torch.autocast(table.device.type, enabled=False):
        for sl in hits.row_blocks():
            torch.mm(hits.dense(sl, values, table.dtype), sub, out=out[sl])
    return out


def project_out_radial(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of unit-norm rows without its component along each row: a step then moves
    rows tangentially (the renorm after the step corrects the curvature). Linear in `grad`, so
    it commutes with gradient averaging over ranks. [rows, d] gradients only (no autograd)."""
    ext = _cpu_sparse_products(grad, weight)
    if ext is not None:
        return ext.project_out_radial(grad.contiguous(), weight.contiguous())
    return torch.addcmul(grad, torch.linalg.vecdot(grad, weight).unsqueeze(1), weight, value=-1)  # one pass out


def _passed(live: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.where(live, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _encoder_grads(needs_input_grad, x_centered, encoder_weight, selections):
    """Gradients in (x, W_enc, b_enc, b_dec) of an encode whose outputs are the values at the
    given (indices, live, upstream gradient) selections: TopK's, and AuxK's from the same pass."""
    n = encoder_weight.shape[0]
    need_x, need_w, need_benc, need_bdec = needs_input_grad[:4]
    coeffs = [(idx, _passed(live, grad)) for idx, live, grad in selections]
    grad_x = grad_w = grad_benc = grad_bdec = None
    if need_benc or need_bdec:
        grad_benc = coeffs[0][1].new_zeros(n)
        for idx, g in coeffs:
            grad_benc.index_add_(0, idx.reshape(-1), g.reshape(-1))
    if need_w:
        for idx, g in coeffs:
            grad_w = scatter_outer(idx, g, x_centered, n, out=grad_w)
        grad_w = grad_w.to(encoder_weight.dtype)
    if need_x:
        grad_x = sum(gather_sum(idx, g, encoder_weight) for idx, g in coeffs)
    if need_bdec:
        # Reduce over the batch first: sum_b grad_x[b] = grad_b_enc @ W_enc, one matvec.
        grad_bdec = -(grad_benc @ encoder_weight)
    return grad_x, grad_w, grad_benc if need_benc else None, grad_bdec


class TopKEncode(torch.autograd.Function):
    """values, indices = TopK((x - b_dec) @ W_enc^T + b_enc), backward through the k only.
    With `aux` = (latent ids, k_aux), also AuxK's values and indices among those latents, from
    the same pass; its backward then adds theirs."""

    @staticmethod
    def forward(ctx, x, encoder_weight, encoder_bias, b_dec, k, use_abs, latent_mask, chunk_size, aux=None):
        x_centered = x - b_dec
        sel = select_topk(x_centered, encoder_weight, encoder_bias, k, use_abs, latent_mask, chunk_size, aux)
        live = _activation_mask(sel.pre, sel.valid, use_abs)
        outputs, saved = [_passed(live, sel.pre), sel.indices], [sel.indices, live]
        if aux is not None:
            aux_live = _activation_mask(sel.aux_pre, torch.ones_like(sel.aux_indices, dtype=torch.bool), use_abs)
            outputs += [_passed(aux_live, sel.aux_pre), sel.aux_indices]
            saved += [sel.aux_indices, aux_live]
        ctx.save_for_backward(x_centered, encoder_weight, *saved)
        ctx.mark_non_differentiable(*outputs[1::2])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x_centered, encoder_weight, *saved = ctx.saved_tensors
        selections = [(idx, live, grad) for idx, live, grad in zip(saved[0::2], saved[1::2], grads[0::2])]
        return (*_encoder_grads(ctx.needs_input_grad, x_centered, encoder_weight, selections),
                None, None, None, None, None)


class EncodeAt(torch.autograd.Function):
    """TopKEncode's values and backward at a selection made elsewhere (indices given)."""

    @staticmethod
    def forward(ctx, x, encoder_weight, encoder_bias, b_dec, indices, use_abs):
        x_centered = x - b_dec
        pre = gather_dot(indices, encoder_weight, x_centered) + encoder_bias[indices]
        live = torch.ones_like(pre, dtype=torch.bool) if use_abs else pre > 0
        ctx.save_for_backward(x_centered, encoder_weight, indices, live)
        return _passed(live, pre)

    @staticmethod
    def backward(ctx, grad_values):
        x_centered, encoder_weight, indices, live = ctx.saved_tensors
        return (*_encoder_grads(ctx.needs_input_grad, x_centered, encoder_weight, [(indices, live, grad_values)]),
                None, None)


class SparseDecode(torch.autograd.Function):
    """x_hat = sum_j values[:, j] * W_dec[indices[:, j]]; gradients only at selected rows."""

    @staticmethod
    def forward(ctx, values, indices, decoder_weight):
        ctx.save_for_backward(values, indices, decoder_weight)
        return gather_sum(indices, values, decoder_weight)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, decoder_weight = ctx.saved_tensors
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(indices, decoder_weight, grad_out).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = scatter_outer(indices, values, grad_out, decoder_weight.shape[0]).to(decoder_weight.dtype)
        return grad_values, None, grad_w


def topk_encode(
    x: torch.Tensor,
    encoder_weight: torch.Tensor,
    encoder_bias: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    *,
    use_abs: bool = False,
    latent_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LATENT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    return TopKEncode.apply(x, encoder_weight, encoder_bias, b_dec, k, use_abs, latent_mask, chunk_size)


def topk_encode_with_aux(x, encoder_weight, encoder_bias, b_dec, k, aux_ids, k_aux, *, use_abs=False,
                         chunk_size=DEFAULT_LATENT_CHUNK):
    """topk_encode and AuxK's selection in one pass: (values, indices, aux values, aux indices)."""
    return TopKEncode.apply(x, encoder_weight, encoder_bias, b_dec, k, use_abs, None, chunk_size, (aux_ids, k_aux))


def encode_at(x, encoder_weight, encoder_bias, b_dec, indices, *, use_abs: bool = False) -> torch.Tensor:
    return EncodeAt.apply(x, encoder_weight, encoder_bias, b_dec, indices, use_abs)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
    return SparseDecode.apply(values, indices, decoder_weight)


def dense_topk_reference(x, encoder_weight, encoder_bias, b_dec, k, use_abs=False, latent_mask=None):
    """Plain dense autograd version (materialises B x n): the ground truth for tests."""
    pre = (x - b_dec) @ encoder_weight.T + encoder_bias
    score = _score(pre, use_abs)
    if latent_mask is not None:
        score = score.masked_fill(~latent_mask, float("-inf"))
    score, idx = score.topk(k, dim=1)
    sel = pre.gather(1, idx)
    valid = torch.isfinite(score)
    live = _activation_mask(sel.detach(), valid, use_abs)
    values = torch.where(live, sel, torch.zeros_like(sel))
    return values, idx
