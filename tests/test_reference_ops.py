"""The PyTorch sparse ops against dense float64 autograd (values, indices, all gradients)."""

import pytest
import torch

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
