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

import torch
import torch.nn.functional as F

DEFAULT_LATENT_CHUNK = 4096
_TILE_ELEMS = 1 << 22  # rows x chunk of one pre-activation tile: 16 MiB in fp32, fits L3
_BATCH_CHUNK_ELEMS = 1 << 18  # bound on B_chunk * k * d temporaries (non-CPU fallback)
_CSR_DTYPES = (torch.float32, torch.float64)  # what the CPU sparse kernels implement
_CSR_MIN_WORK = 1 << 20  # B*k*d below which the plain loops win (no sparse-kernel setup)
# k / (latents hit) above which G^T @ rows is cheaper as a dense product over the hit latents:
# a dense matmul does >= 25x more multiply-adds per second than the CSR kernel, which degrades
# further with many non-zeros per row (AuxK: k_aux = 256 of ~1.7k dead latents, 7.6x faster).
_DENSE_SCATTER_DENSITY = 1 / 32
_DENSE_SCATTER_ELEMS = 1 << 24  # bound on the dense [rows, latents hit] block (64 MiB fp32)

_EXT_ROWS, _EXT_CHUNK = 512, 1024  # rows x latents of a fused CPU selection tile (2 MiB fp32: in L2)

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


@torch.no_grad()
def select_topk(
    x_centered: torch.Tensor,
    encoder_weight: torch.Tensor,
    encoder_bias: torch.Tensor,
    k: int,
    use_abs: bool = False,
    latent_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LATENT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-activations and indices of the k best latents per row, plus a validity mask.

    The best latents maximise `pre` (or `|pre|` with use_abs) among latents allowed by
    `latent_mask`. `valid` is False where fewer than k latents were allowed.
    """
    B, n = x_centered.shape[0], encoder_weight.shape[0]
    bias = encoder_bias
    if latent_mask is not None and not use_abs:
        bias = encoder_bias.masked_fill(~latent_mask, float("-inf"))  # can never be selected
    fused = _fused_cpu_selection(x_centered, encoder_weight, bias, k)
    if fused is not None:
        rows_per_task = max(1, min(_EXT_ROWS, -(-B // (2 * torch.get_num_threads()))))  # >= 2 tasks a thread
        pre, idx, score = fused.select_topk(*(t.detach().contiguous() for t in (x_centered, encoder_weight, bias)),
                                            k, use_abs, latent_mask if use_abs else None, _EXT_CHUNK, rows_per_task)
        return pre, idx, torch.isfinite(score)
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
    valid = torch.isfinite(best_score)
    return best_pre, best_idx, valid


def _fused_cpu_selection(x_centered, encoder_weight, bias, k):
    """kernels/cpu_topk.cpp when it applies (CPU, float32, k <= n) and is built, else None."""
    if not (x_centered.device.type == "cpu" and 1 <= k <= encoder_weight.shape[0] and x_centered.shape[0] > 0
            and all(t.dtype == torch.float32 for t in (x_centered, encoder_weight, bias))):
        return None
    from kernels import cpu_ext  # noqa: PLC0415 (`python -m kernels.cpu_ext` must find it unimported)

    return cpu_ext.load()


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


def scatter_outer(
    indices: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """sum_b sum_j coeffs[b, j] * rows[b] added at latent indices[b, j]: G^T @ rows with
    G sparse [B, n_latents] (k non-zeros per row). Cost B*k*d, never B*n."""
    B, k = indices.shape
    d = rows.shape[1]
    hit = torch.bincount(indices.reshape(-1), minlength=n_latents).nonzero().squeeze(1)
    if k >= _DENSE_SCATTER_DENSITY * hit.numel():
        return _scatter_outer_dense(indices, coeffs, rows, hit, n_latents)
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


def _scatter_outer_dense(indices, coeffs, rows, hit, n_latents):
    """scatter_outer as G_hit^T @ rows with G_hit the dense [B, |hit|] block of G's hit columns."""
    B, d = rows.shape
    local = torch.empty(n_latents, dtype=torch.int64, device=indices.device)
    local[hit] = torch.arange(hit.numel(), device=indices.device)
    local = local[indices]
    acc = rows.new_zeros(hit.numel(), d)
    step = max(1, _DENSE_SCATTER_ELEMS // max(hit.numel(), 1))
    with torch.autocast(rows.device.type, enabled=False):
        for r0 in range(0, B, step):
            sl = slice(r0, min(r0 + step, B))
            g = rows.new_zeros(sl.stop - sl.start, hit.numel()).scatter_add_(1, local[sl], coeffs[sl].to(rows.dtype))
            acc.addmm_(g.T, rows[sl])
    if hit.numel() == n_latents:
        return acc
    return rows.new_zeros(n_latents, d).index_copy_(0, hit, acc)


def gather_dot(indices: torch.Tensor, table: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """out[b, j] = <vectors[b], table[indices[b, j]]>: (vectors @ table^T) sampled at the
    k selected entries per row, never the dense product."""
    B, k = indices.shape
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
    return F.embedding_bag(indices, table, per_sample_weights=values.to(table.dtype), mode="sum")


class TopKEncode(torch.autograd.Function):
    """values, indices = TopK((x - b_dec) @ W_enc^T + b_enc), backward through the k only."""

    @staticmethod
    def forward(ctx, x, encoder_weight, encoder_bias, b_dec, k, use_abs, latent_mask, chunk_size):
        x_centered = x - b_dec
        pre, idx, valid = select_topk(
            x_centered, encoder_weight, encoder_bias, k, use_abs, latent_mask, chunk_size
        )
        live = _activation_mask(pre, valid, use_abs)
        values = torch.where(live, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        ctx.save_for_backward(x_centered, encoder_weight, idx, live)
        ctx.mark_non_differentiable(idx)
        return values, idx

    @staticmethod
    def backward(ctx, grad_values, _grad_idx):
        x_centered, encoder_weight, idx, live = ctx.saved_tensors
        n = encoder_weight.shape[0]
        g = torch.where(live, grad_values, torch.zeros((), dtype=grad_values.dtype, device=grad_values.device))
        need_x, need_w, need_benc, need_bdec = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_benc = grad_bdec = None
        if need_benc or need_bdec:
            grad_benc = g.new_zeros(n).index_add_(0, idx.reshape(-1), g.reshape(-1))
        if need_w:
            grad_w = scatter_outer(idx, g, x_centered, n).to(encoder_weight.dtype)
        if need_x:
            grad_x = gather_sum(idx, g, encoder_weight)
        if need_bdec:
            # Reduce over the batch first: sum_b grad_x[b] = grad_b_enc @ W_enc, one matvec.
            grad_bdec = -(grad_benc @ encoder_weight)
        return grad_x, grad_w, grad_benc if need_benc else None, grad_bdec, None, None, None, None


class EncodeAt(torch.autograd.Function):
    """TopKEncode's values and backward at a selection made elsewhere (indices given)."""

    @staticmethod
    def forward(ctx, x, encoder_weight, encoder_bias, b_dec, indices, use_abs):
        x_centered = x - b_dec
        pre = gather_dot(indices, encoder_weight, x_centered) + encoder_bias[indices]
        live = torch.ones_like(pre, dtype=torch.bool) if use_abs else pre > 0
        ctx.save_for_backward(x_centered, encoder_weight, indices, live)
        return torch.where(live, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))

    @staticmethod
    def backward(ctx, grad_values):
        return (*TopKEncode.backward(ctx, grad_values, None)[:4], None, None)


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
