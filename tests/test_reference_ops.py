"""The PyTorch sparse ops against dense float64 autograd (values, indices, all gradients)."""

import pytest
import torch

from _selection import assert_same_topk, topk_margin
from kernels import cpu_ext
from kernels import reference as ref


def _inputs(B, d, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    W = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
    b_enc = torch.randn(n, generator=g, dtype=dtype) * 0.1
    b_dec = torch.randn(d, generator=g, dtype=dtype) * 0.1
    return [t.requires_grad_() for t in (x, W, b_enc, b_dec)]


def _sorted_by_index(values, idx):
    order = idx.argsort(dim=1)
    return values.gather(1, order), idx.gather(1, order)


@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("B,d,n,k,chunk", [(7, 5, 13, 1, 4), (9, 6, 33, 5, 8), (4, 3, 10, 9, 3), (5, 4, 17, 17, 64)])
def test_topk_encode_matches_dense(B, d, n, k, chunk, use_abs):
    inp = _inputs(B, d, n, seed=B * 100 + n)
    dense_inp = [t.detach().clone().requires_grad_() for t in inp]
    v, i = ref.TopKEncode.apply(*inp, k, use_abs, None, chunk)
    dv, di = ref.dense_topk_reference(*dense_inp, k, use_abs)
    v_s, i_s = _sorted_by_index(v, i)
    dv_s, di_s = _sorted_by_index(dv, di)
    assert torch.equal(i_s, di_s)
    torch.testing.assert_close(v_s, dv_s)
    upstream = torch.randn_like(v)
    # same upstream gradient per (row, latent) in both orders
    up_dense = torch.zeros(B, n, dtype=v.dtype).scatter(1, i, upstream).gather(1, di)
    (v * upstream).sum().backward()
    (dv * up_dense).sum().backward()
    for a, b in zip(inp, dense_inp):
        torch.testing.assert_close(a.grad, b.grad)


def test_latent_mask_restricts_and_pads():
    x, W, b_enc, b_dec = _inputs(6, 4, 20, seed=3)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[2, 7, 11]] = True
    v, i = ref.topk_encode(x, W, b_enc, b_dec, 5, use_abs=True, latent_mask=mask, chunk_size=6)
    real = v != 0
    assert set(i[real].tolist()) <= {2, 7, 11}
    assert (real.sum(1) == 3).all()  # only 3 allowed latents: the other 2 slots are inert


def test_gradcheck_encode_and_decode():
    x, W, b_enc, b_dec = _inputs(5, 4, 11, seed=7)
    torch.autograd.gradcheck(lambda *a: ref.TopKEncode.apply(*a, 3, False, None, 4)[0], (x, W, b_enc, b_dec))
    torch.autograd.gradcheck(lambda *a: ref.TopKEncode.apply(*a, 3, True, None, 4)[0], (x, W, b_enc, b_dec))
    vals = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 11, (5, 3))
    Wd = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v, w: ref.SparseDecode.apply(v, idx, w), (vals, Wd))


def test_ties_select_a_valid_set():
    x = torch.ones(3, 2, dtype=torch.float64)
    W = torch.ones(8, 2, dtype=torch.float64)  # every latent has the same pre-activation
    v, i = ref.topk_encode(x, W, torch.zeros(8, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 3, chunk_size=3)
    assert (v == 2).all()
    assert all(len(set(row)) == 3 for row in i.tolist())


def _poisoned_empty(real_empty):
    def empty(*size, dtype=None, device=None, **kw):
        t = real_empty(*size, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    return empty


@pytest.mark.parametrize("use_abs,masked", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("chunk", [16, 13])  # 16: strided-group filter; 13: element filter
@pytest.mark.parametrize("scatter", ["csr", "dense", "cpp"])
@pytest.mark.parametrize("selection", ["torch", "fused"])
def test_cpu_fast_paths_match_dense(monkeypatch, use_abs, masked, chunk, scatter, selection):
    """Many row blocks, the threshold filter (PyTorch selection) or many tasks and tiles (the
    fused C++ selection), the CSR, dense-over-hit-latents or C++ backward products (each forced
    on at this size) and reused / fresh buffers poisoned with NaN: still the dense float64 result."""
    if selection == "fused" or scatter == "cpp":
        assert cpu_ext.load() is not None, "the C++ CPU kernels did not build: see the warning"
    if selection == "fused":
        monkeypatch.setattr(ref, "_EXT_ROWS", 4)
        monkeypatch.setattr(ref, "_EXT_CHUNK", chunk)
    else:
        monkeypatch.setattr(ref, "_fused_cpu_selection", lambda *args: None)
    if scatter != "cpp":
        monkeypatch.setattr(ref, "_cpu_sparse_products", lambda *tensors: None)
    monkeypatch.setattr(ref, "_TILE_ELEMS", 64)  # 4-row blocks
    monkeypatch.setattr(ref, "_CSR_MIN_WORK", 0)
    monkeypatch.setattr(ref, "_DENSE_OVER_HITS", dict.fromkeys(ref._DENSE_OVER_HITS, 0.0 if scatter == "dense" else
                                                                  float("inf")))
    monkeypatch.setattr(ref, "_DENSE_SCATTER_ELEMS", 7 * 40)  # several row chunks of the dense block
    monkeypatch.setattr(ref, "_scratch_buffers", __import__("threading").local())
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    B, d, n, k = 37, 9, 120, 5
    inp = _inputs(B, d, n, seed=chunk + 10 * use_abs + 100 * masked, dtype=torch.float32)
    mask = (torch.arange(n) % 3 != 0) if masked else None
    dense_inp = [t.detach().double().requires_grad_() for t in inp]
    v, i = ref.topk_encode(*inp, k, use_abs=use_abs, latent_mask=mask, chunk_size=chunk)
    dv, di = ref.dense_topk_reference(*dense_inp, k, use_abs, mask)
    x64, w64, b64, bd64 = (t.detach() for t in dense_inp)
    pre = (x64 - bd64) @ w64.T + b64
    score = pre.abs() if use_abs else pre
    if mask is not None:
        score = score.masked_fill(~mask, float("-inf"))
    assert topk_margin(score, k) > 1e-5  # the seeded inputs leave room for float32 rounding: any flip is a bug
    assert assert_same_topk(i, score, k).all()
    v_s, i_s = _sorted_by_index(v, i)
    dv_s, di_s = _sorted_by_index(dv, di)
    torch.testing.assert_close(v_s.double(), dv_s, atol=1e-5, rtol=1e-5)
    Wd = torch.randn(n, 11, requires_grad=True)
    Wd64 = Wd.detach().double().requires_grad_()
    out = ref.sparse_decode(v, i, Wd)
    dout = ref.sparse_decode(dv, di, Wd64)
    up = torch.randn_like(out)
    (out * up).sum().backward()
    (dout * up.double()).sum().backward()
    torch.testing.assert_close(out.double(), dout, atol=1e-5, rtol=1e-5)
    for a, b in zip(inp + [Wd], dense_inp + [Wd64]):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4)


def test_bf16_and_autocast_run_and_agree():
    x, W, b_enc, b_dec = (t.detach() for t in _inputs(64, 32, 300, seed=5, dtype=torch.float32))
    ref_v, ref_i = ref.topk_encode(x, W, b_enc, b_dec, 8)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x, W, b_enc, b_dec)]
    v, i = ref.topk_encode(*leaves, 8)
    ref.sparse_decode(v, i, leaves[1]).float().sum().backward()
    assert v.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in leaves)
    agree = (i.sort(1).values == ref_i.sort(1).values).all(1).float().mean()
    assert agree > 0.8  # bf16 rounding may swap near-ties
    with torch.autocast("cpu", dtype=torch.bfloat16):
        av, ai = ref.topk_encode(x, W.requires_grad_(), b_enc, b_dec, 8)
        out = ref.sparse_decode(av, ai, W)
    out.float().sum().backward()
    assert torch.isfinite(W.grad).all()
    torch.testing.assert_close(av.float().sort(1).values, ref_v.sort(1).values, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("allowed", [None, 20, 3])  # all latents; fewer than n; fewer than k (padded, invalid)
def test_fused_cpu_selection_matches_the_torch_path(monkeypatch, use_abs, allowed):
    """kernels/cpu_topk.cpp against the PyTorch selection at a size with many tasks and tiles:
    the same sets away from ties, the same pre-activations, the same validity."""
    assert cpu_ext.load() is not None, "the C++ CPU kernels did not build: see the warning"
    monkeypatch.setattr(ref, "_EXT_CHUNK", 96)
    B, d, n, k = 300, 24, 1000, 8
    x, W, b, _ = (t.detach() for t in _inputs(B, d, n, seed=3 + use_abs, dtype=torch.float32))
    mask = None if allowed is None else torch.arange(n) * 7919 % n < allowed  # spread: 7919 is prime
    fused = ref.select_topk(x, W, b, k, use_abs, mask)
    monkeypatch.setenv(cpu_ext.ENV_SWITCH, "0")
    plain = ref.select_topk(x, W, b, k, use_abs, mask)
    pre = x.double() @ W.double().T + b.double()
    score = pre.abs() if use_abs else pre
    if mask is not None:
        score = score.masked_fill(~mask, float("-inf"))
    assert torch.equal(fused[2].sum(1), plain[2].sum(1))  # as many valid slots per row
    valid = fused[2]
    if allowed is None or allowed >= k:
        assert valid.all() and assert_same_topk(fused[1], score, k).all()
    else:  # every allowed latent is picked, once
        picked = torch.where(valid, fused[1], -1).sort(1).values[:, -allowed:]
        assert torch.equal(picked, mask.nonzero().squeeze(1).expand(B, -1))
    got = torch.where(valid, fused[0], 0).double()
    torch.testing.assert_close(got, torch.where(valid, pre.gather(1, fused[1]), 0), atol=1e-4, rtol=1e-4)


def _dense_scores(x, W, b, use_abs, columns=None):
    pre = x.detach().double() @ W.detach().double().T + b.detach().double()
    pre = pre if columns is None else pre[:, columns]
    return pre, (pre.abs() if use_abs else pre)


@pytest.mark.parametrize("use_abs,masked", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("selection", ["torch", "fused"])
def test_aux_selection_is_the_top_k_among_its_latents(monkeypatch, use_abs, masked, selection):
    """AuxK's selection made with the encode (`aux=`): the top k_aux among the requested latents
    only, unrestricted by latent_mask, with the right pre-activations; the main selection is
    unchanged. Fused: many tasks, tiles and aux buffers of a few rows."""
    if selection == "fused":
        assert cpu_ext.load() is not None, "the C++ CPU kernels did not build: see the warning"
        monkeypatch.setattr(ref, "_EXT_CHUNK", 96)
        monkeypatch.setattr(ref, "_EXT_AUX_ELEMS", 3 * 150)  # 3 rows a task
    else:
        monkeypatch.setenv(cpu_ext.ENV_SWITCH, "0")
    B, d, n, k, k_aux = 300, 24, 1000, 8, 20
    x, W, b, _ = (t.detach() for t in _inputs(B, d, n, seed=11 + use_abs + 2 * masked, dtype=torch.float32))
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:150].sort().values
    mask = (torch.arange(n) % 3 != 0) if masked else None
    sel = ref.select_topk(x, W, b, k, use_abs, mask, aux=(ids, k_aux))
    _, score = _dense_scores(x, W, b, use_abs)
    if mask is not None:
        score = score.masked_fill(~mask, float("-inf"))
    assert sel.valid.all()
    assert_same_topk(sel.indices, score, k)  # (a row may differ only at a float32 near-tie)
    aux_pre, aux_score = _dense_scores(x, W, b, use_abs, ids)
    positions = torch.searchsorted(ids, sel.aux_indices)
    assert torch.equal(ids[positions], sel.aux_indices)  # only requested latents
    assert assert_same_topk(positions, aux_score, k_aux).float().mean() > 0.95
    torch.testing.assert_close(sel.aux_pre.double(), aux_pre.gather(1, positions), atol=1e-4, rtol=1e-4)
    if masked:
        assert (~mask[sel.aux_indices]).any()  # the mask does not restrict AuxK's latents


@pytest.mark.parametrize("use_abs", [False, True])
def test_encode_with_aux_routes_both_gradients(use_abs):
    """topk_encode_with_aux's values at both selections carry the dense float64 gradients of
    relu(pre) (pre with use_abs) at the selected entries, summed where the two overlap."""
    B, d, n, k, k_aux = 23, 7, 60, 4, 6
    inp = _inputs(B, d, n, seed=21 + use_abs)
    ids = torch.arange(1, n, 3)  # 20 latents, some also in the main selection
    v, i, av, ai = ref.topk_encode_with_aux(*inp, k, ids, k_aux, use_abs=use_abs, chunk_size=16)
    dense_inp = [t.detach().clone().requires_grad_() for t in inp]
    x, W, b_enc, b_dec = dense_inp
    pre = (x - b_dec) @ W.T + b_enc
    score = pre.abs() if use_abs else pre
    assert assert_same_topk(i, score, k).all()  # float64: the same arithmetic, no rounding flips
    assert assert_same_topk(torch.searchsorted(ids, ai), score[:, ids], k_aux).all()
    act = (lambda p: p) if use_abs else torch.relu
    up, up_aux = torch.randn(B, k, dtype=v.dtype), torch.randn(B, k_aux, dtype=v.dtype)
    torch.testing.assert_close(v, act(pre.gather(1, i)).detach())
    torch.testing.assert_close(av, act(pre.gather(1, ai)).detach())
    ((v * up).sum() + (av * up_aux).sum()).backward()
    ((act(pre.gather(1, i)) * up).sum() + (act(pre.gather(1, ai)) * up_aux).sum()).backward()
    for a, b in zip(inp, dense_inp):
        torch.testing.assert_close(a.grad, b.grad)


def test_aux_selection_rejects_bad_requests():
    x, W, b, _ = (t.detach() for t in _inputs(4, 3, 10, seed=1, dtype=torch.float32))
    for ids, k_aux, why in [(torch.tensor([3, 1]), 1, "ascending"), (torch.tensor([1, 10]), 1, r"\[0, 10\)"),
                            (torch.tensor([1, 2]), 3, "k_aux"), (torch.tensor([1.0, 2.0]), 1, "int64")]:
        with pytest.raises(ValueError, match=why):
            ref.select_topk(x, W, b, 2, aux=(ids, k_aux))


@pytest.mark.parametrize("B,k,n,d", [(37, 5, 120, 9), (3, 4, 7, 67), (0, 3, 10, 8)])  # odd widths; no rows
def test_cpp_sparse_products_match_float64(B, k, n, d):
    """kernels/cpu_sparse.cpp's products against their float64 definitions, with latents
    repeated within a row and latents no row hits (their output rows must be zero)."""
    ext = cpu_ext.load()
    assert ext is not None, "the C++ CPU kernels did not build: see the warning"
    g = torch.Generator().manual_seed(B + d)
    idx = torch.randint(0, n - 2, (B, k), generator=g)  # the last two latents are never hit
    coeffs, rows = torch.randn(B, k, generator=g), torch.randn(B, d, generator=g)
    table = torch.randn(n, d, generator=g)
    want_dot = torch.einsum("bd,bkd->bk", rows.double(), table.double()[idx])
    torch.testing.assert_close(ext.gather_dot(idx, table, rows).double(), want_dot, atol=1e-5, rtol=1e-5)
    want_scatter = torch.zeros(n, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (coeffs.double().unsqueeze(2) * rows.double().unsqueeze(1)).reshape(-1, d))
    got = ext.scatter_outer(idx, coeffs, rows, n)
    torch.testing.assert_close(got.double(), want_scatter, atol=1e-5, rtol=1e-5)
    assert (got[n - 2:] == 0).all()
    w = torch.nn.functional.normalize(table, dim=1)
    want_radial = table.double() - (table.double() * w.double()).sum(1, keepdim=True) * w.double()
    torch.testing.assert_close(ref.project_out_radial(table, w).double(), want_radial, atol=1e-5, rtol=1e-5)


def test_cpp_sparse_products_reject_bad_input():
    ext = cpu_ext.load()
    assert ext is not None, "the C++ CPU kernels did not build: see the warning"
    idx, rows, table = torch.tensor([[0, 5]]), torch.randn(1, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="gather_dot: latent index out of range"):
        ext.gather_dot(idx, table, rows)
    with pytest.raises(RuntimeError, match="scatter_outer: latent index out of range"):
        ext.scatter_outer(idx, torch.ones(1, 2), rows, 5)
    with pytest.raises(RuntimeError, match="scatter_outer: coefficients must be contiguous float32"):
        ext.scatter_outer(idx.clamp(max=4), torch.ones(1, 2, dtype=torch.float64), rows, 5)
    with pytest.raises(RuntimeError, match="gather_dot: vectors and table rows differ in width"):
        ext.gather_dot(idx.clamp(max=4), table, torch.randn(1, 3))
