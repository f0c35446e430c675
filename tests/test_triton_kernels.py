"""The Triton kernels, run by Triton's CPU interpreter, against the PyTorch reference and
float64 dense autograd: values, indices (up to ties) and every gradient.

Interpreter mode is fixed when a @triton.jit function is created. The kernels are loaded as a
private copy of kernels/triton_ops.py built with TRITON_INTERPRET=1 (restored right after), so
that other test modules in the same pytest process still see the real `kernels.triton_ops` and
their usual dispatch; triton itself is imported in its usual compiled mode first, whatever the
test order, and its standard library is swapped for interpreted functions during each test.
Every buffer the kernels write is allocated poisoned (NaN / out-of-range sentinels), so an
element a kernel forgets to write fails the comparison. Shapes are small and odd on purpose:
the interpreter is slow, and tiles must not divide them.
"""

import importlib.util
import os
import pathlib

import pytest
import torch

try:
    import triton  # noqa: F401  (compiled mode, as for every other module of the process)
except ImportError as err:  # a missing dependency must fail the run, not skip it
    raise ImportError("tests/test_triton_kernels.py needs triton (pip install triton)") from err

from kernels import dispatch
from kernels import reference as ref


def _load_interpreted_triton_ops():
    path = pathlib.Path(ref.__file__).with_name("triton_ops.py")
    spec = importlib.util.spec_from_file_location("_sparsemill_triton_ops_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


T = _load_interpreted_triton_ops()

_POISON = {torch.int64: 2**62, torch.int32: 2**30, torch.int8: 90}


def _poisoned_empty(shape, dtype, device):
    return torch.full(shape, _POISON.get(dtype, float("nan")), dtype=dtype, device=device)


def _interpreted_standard_library() -> list[tuple[object, str, object]]:
    """(owner, name, interpreted function) for every function of triton's standard library
    (tl.zeros, tl.sum, tensor.max...). Triton builds them at `import triton` in the mode of that
    moment, compiled here (as deepspeed or tests/test_kernel_tuning.py's compiled copy would
    have): called from an interpreted kernel, a compiled-mode one raises "Cannot call
    @triton.jit'd outside of the scope of a kernel". Compiled-mode modules need them as they are
    (the ahead-of-time compile test), so they are swapped in per test only."""
    import triton.language as tl  # noqa: PLC0415
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    return [(owner, name, InterpretedFunction(value.fn))
            for owner in (tl, tl.standard, tl.math, tl.core, tl.core.tensor)
            for name, value in list(vars(owner).items()) if isinstance(value, JITFunction)]


_STANDARD_LIBRARY = _interpreted_standard_library()


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Interpreted kernels also read TRITON_INTERPRET while they run (and call an interpreted
    standard library, swapped back after the test for compiled-mode users); outputs are poisoned."""
    assert T.INTERPRET, "the private triton_ops copy was not built for the interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(T, "_empty", _poisoned_empty)
    for owner, name, interpreted in _STANDARD_LIBRARY:
        monkeypatch.setattr(owner, name, interpreted)


# ----------------------------------------------------------------------------------------
# helpers


def _inputs(B, d, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(n, d, generator=g) / d**0.5
    b_enc = torch.randn(n, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    return [t.to(dtype) for t in (x, W, b_enc, b_dec)]


def _dense_pre(x, W, b_enc, b_dec):
    """float64 pre-activations from the same centred input the kernels see."""
    xc = (x - b_dec).double()
    return xc @ W.double().T + b_enc.double()


def _scores(pre, use_abs, mask):
    score = pre.abs() if use_abs else pre.clone()
    if mask is not None:
        score[:, ~mask] = float("-inf")
    return score


def _check_topk(values, idx, pre, k, use_abs, mask, tol):
    """(values, idx) is a top-k of the float64 pre-activations, up to ties within tol."""
    B, n = pre.shape
    assert values.shape == (B, k) and idx.shape == (B, k) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < n)).all(), "index out of range (unwritten slot?)"
    assert all(len(set(row)) == k for row in idx.tolist()), "a latent selected twice in a row"
    score = _scores(pre, use_abs, mask)
    best = score.topk(k, dim=1).values
    picked = score.gather(1, idx)
    torch.testing.assert_close(picked.sort(1, descending=True).values, best, atol=tol, rtol=0)
    sel = pre.gather(1, idx)
    live = torch.isfinite(picked) & ((sel > 0) | use_abs)
    expect = torch.where(live, sel, torch.zeros((), dtype=sel.dtype))
    torch.testing.assert_close(values.double(), expect, atol=tol, rtol=tol)
    # rows whose k-th and (k+1)-th scores are clearly apart must select exactly the same set
    if k < n:
        top = score.topk(k + 1, dim=1)
        clear = (top.values[:, k - 1] - top.values[:, k]) > 10 * tol
        clear &= torch.isfinite(top.values[:, k - 1])
        mine = idx.sort(1).values[clear]
        theirs = top.indices[:, :k].sort(1).values[clear]
        assert torch.equal(mine, theirs)


def _oracle_grads(x, W, b_enc, b_dec, idx, upstream, use_abs, mask):
    """float64 dense autograd of sum(values * upstream) for the latents in idx: the gradient
    the kernels must produce for their own selection, however ties were broken."""
    leaves = [t.detach().double().requires_grad_() for t in (x, W, b_enc, b_dec)]
    pre = (leaves[0] - leaves[3]) @ leaves[1].T + leaves[2]
    sel = pre.gather(1, idx)
    allowed = torch.ones_like(sel, dtype=torch.bool) if mask is None else mask[idx]
    live = allowed & ((sel.detach() > 0) | use_abs)
    values = torch.where(live, sel, torch.zeros((), dtype=sel.dtype))
    (values * upstream.double()).sum().backward()
    return [t.grad for t in leaves]


def _run_encode(inputs, k, use_abs, mask, deterministic, upstream_seed=0):
    leaves = [t.clone().requires_grad_() for t in inputs]
    values, idx = T.topk_encode(*leaves, k, use_abs=use_abs, latent_mask=mask, deterministic=deterministic)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(values.shape, generator=g)
    (values.float() * upstream).sum().backward()
    return values.detach(), idx, upstream, [t.grad for t in leaves]


ENCODE_CASES = [
    # B, d, n, k, use_abs, n_allowed (latent mask), deterministic
    (21, 37, 101, 5, False, None, False),  # two row blocks, two latent splits, two d tiles
    (13, 37, 101, 5, True, None, True),
    (9, 20, 70, 1, False, None, True),
    (9, 20, 70, 1, True, None, False),
    (7, 33, 37, 33, False, None, False),  # k close to n: KP = 64 > the usual tile; d = 32 + 1
    (5, 17, 20, 20, True, None, True),  # k = n
    (11, 24, 90, 6, False, 4, False),  # fewer allowed latents than k: inert slots
    (11, 24, 90, 6, True, 40, True),
]


@pytest.mark.parametrize("B,d,n,k,use_abs,n_allowed,deterministic", ENCODE_CASES)
def test_topk_encode_matches_references(B, d, n, k, use_abs, n_allowed, deterministic):
    _assert_encode_matches_references(B, d, n, k, use_abs, n_allowed, deterministic)


def _assert_encode_matches_references(B, d, n, k, use_abs, n_allowed, deterministic):
    inputs = _inputs(B, d, n, seed=B * 1000 + n + k)
    mask = None
    if n_allowed is not None:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=torch.Generator().manual_seed(n))[:n_allowed]] = True
    values, idx, upstream, grads = _run_encode(inputs, k, use_abs, mask, deterministic)
    pre = _dense_pre(*inputs)
    _check_topk(values, idx, pre, k, use_abs, mask, tol=1e-5)
    if use_abs:
        picked = pre.gather(1, idx)
        assert ((values < 0) == (picked < 0) & (values != 0)).all(), "AbsTopK lost a sign"
    # gradients: float64 dense autograd restricted to the kernel's own selection
    for mine, oracle in zip(grads, _oracle_grads(*inputs, idx, upstream, use_abs, mask)):
        torch.testing.assert_close(mine.double(), oracle, atol=2e-5, rtol=1e-4)
    # and the PyTorch reference (fp32, chunked) agrees: same sets (no near-ties here), same grads
    leaves = [t.clone().requires_grad_() for t in inputs]
    r_values, r_idx = ref.topk_encode(*leaves, k, use_abs=use_abs, latent_mask=mask, chunk_size=16)
    _check_topk(r_values.detach(), r_idx, pre, k, use_abs, mask, tol=1e-5)
    live = values != 0
    assert torch.equal(idx.masked_fill(~live, -1).sort(1).values, r_idx.masked_fill(r_values == 0, -1).sort(1).values)
    up_by_latent = torch.zeros(B, n).scatter(1, idx, upstream)
    (r_values * up_by_latent.gather(1, r_idx)).sum().backward()
    for mine, theirs in zip(grads, (t.grad for t in leaves)):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


def test_many_splits_and_short_splits():
    """Latent ranges shorter than a tile and than k: the per-split candidates carry padding
    that must never surface, and the merge runs over several splits."""
    B, d, n, k = 6, 19, 45, 10
    inputs = _inputs(B, d, n, seed=5)
    xc = (inputs[0] - inputs[3]).contiguous()
    for split_len in (16, 7):
        values, idx, live = T.encode_forward(xc, inputs[1], inputs[2], k, False, None, split_len=split_len)
        _check_topk(values, idx, _dense_pre(*inputs), k, False, None, tol=1e-5)
        assert torch.equal(live, values != 0)


@pytest.fixture
def short_lists(monkeypatch):
    """Lists of 16 per split: k > 16 takes the large-k path at interpreter-sized shapes."""
    monkeypatch.setattr(T, "KP_MAX", 16)
    monkeypatch.setattr(T, "LARGE_KS", 16)


LARGE_CASES = [
    # B, d, n, k, use_abs, n_allowed, deterministic: k > KP_MAX, k = n (threshold widening), masks
    (11, 24, 150, 40, False, None, False),
    (9, 20, 70, 70, True, None, True),
    (10, 24, 120, 33, True, 50, False),
    (8, 17, 90, 30, False, 20, True),  # fewer allowed latents than k
]


@pytest.mark.parametrize("B,d,n,k,use_abs,n_allowed,deterministic", LARGE_CASES)
def test_large_k_path_matches_references(short_lists, B, d, n, k, use_abs, n_allowed, deterministic):
    _assert_encode_matches_references(B, d, n, k, use_abs, n_allowed, deterministic)


def test_large_k_reruns_rows_a_split_may_hide(short_lists, monkeypatch):
    """When one split holds more of a row's top k than its list keeps (here every top latent
    sits in the first split), the first pass cannot be exact: those rows are re-run with
    shorter splits, and the result is the exact top k."""
    B, d, n, k = 6, 16, 150, 40
    x, W, b_enc, b_dec = _inputs(B, d, n, seed=21)
    b_enc = b_enc.clone()
    b_enc[:k] += 20.0  # the k best latents of every row: 0..k-1, all in the first split(s)
    passes = []
    tiles = T._tile_candidates
    monkeypatch.setattr(T, "_tile_candidates", lambda xc, *a: passes.append(xc.shape[0]) or tiles(xc, *a))
    xc = (x - b_dec).contiguous()
    values, idx, live = T.encode_forward(xc, W, b_enc, k)
    assert len(passes) >= 2 and passes[0] == B, passes  # a re-run happened
    assert torch.equal(idx.sort(1).values, torch.arange(k).expand(B, k))
    _check_topk(values, idx, _dense_pre(x, W, b_enc, b_dec), k, False, None, tol=1e-5)


def test_large_split_len_holds_enough_candidates():
    for n, k, ks in [(150, 40, 16), (65536, 2048, 128), (300, 200, 128), (4096, 4096, 128), (129, 129, 128)]:
        split = T.large_split_len(n, k, ks)
        assert split >= ks and -(-n // split) * ks >= k, (n, k, split)


def _rounded(t, dtype=torch.bfloat16):
    return t.to(dtype).double()


def test_bf16_compute_selects_the_top_k_of_rounded_operands():
    """compute_dtype=bf16 with fp32 tensors: the matmul sees bf16-rounded x - b_dec and W_enc
    (tensor cores on GPU), accumulates in fp32; values stay fp32, gradients use the fp32
    masters. Selection and values match float64 of the rounded operands; AbsTopK keeps signs."""
    B, d, n, k = 9, 40, 70, 6
    inputs = _inputs(B, d, n, seed=31)
    x, W, b_enc, b_dec = inputs
    pre = _rounded(x - b_dec) @ _rounded(W).T + b_enc.double()
    for use_abs in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        values, idx = T.topk_encode(*leaves, k, use_abs=use_abs, compute_dtype=torch.bfloat16)
        assert values.dtype == torch.float32
        _check_topk(values.detach(), idx, pre, k, use_abs, None, tol=1e-5)
        if use_abs:
            picked = pre.gather(1, idx)
            assert ((values < 0) == (picked < 0) & (values != 0)).all(), "AbsTopK lost a sign in bf16"
        upstream = torch.randn(values.shape, generator=torch.Generator().manual_seed(1))
        (values * upstream).sum().backward()
        for mine, oracle in zip((t.grad for t in leaves), _oracle_grads(*inputs, idx, upstream, use_abs, None)):
            assert mine.dtype == torch.float32
            torch.testing.assert_close(mine.double(), oracle, atol=2e-5, rtol=1e-4)


def test_bf16_compute_ties_are_valid():
    """Rounding to bf16 creates exact ties (here duplicated rows); any tied latent may win,
    indices stay distinct and gradients follow the chosen ones."""
    B, d, n, k = 7, 16, 40, 6
    x, W, b_enc, b_dec = _inputs(B, d, n, seed=12)
    W = W[torch.arange(n) % 5].contiguous()
    b_enc = b_enc[torch.arange(n) % 5].contiguous()
    inputs = [x, W, b_enc, b_dec]
    pre = _rounded(x - b_dec) @ _rounded(W).T + b_enc.double()
    for use_abs in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        values, idx = T.topk_encode(*leaves, k, use_abs=use_abs, compute_dtype=torch.bfloat16, deterministic=True)
        _check_topk(values.detach(), idx, pre, k, use_abs, None, tol=1e-5)
        upstream = torch.randn(values.shape, generator=torch.Generator().manual_seed(2))
        (values * upstream).sum().backward()
        for mine, oracle in zip((t.grad for t in leaves), _oracle_grads(*inputs, idx, upstream, use_abs, None)):
            torch.testing.assert_close(mine.double(), oracle, atol=2e-5, rtol=1e-4)


def test_autocast_reaches_the_kernels(monkeypatch):
    """train.autocast wraps the objective in torch.autocast: the dispatch hands its dtype to the
    kernel as the matmul operands' dtype (autocast does not reach custom autograd Functions)."""
    monkeypatch.setattr(dispatch, "_triton_backend", lambda: T)
    seen = []
    forward = T.encode_forward
    monkeypatch.setattr(T, "encode_forward", lambda xc, w, *a, **kw: seen.append((xc.dtype, w.dtype)) or
                        forward(xc, w, *a, **kw))
    x, W, b_enc, b_dec = _inputs(6, 16, 30, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_auto, i_auto = dispatch.topk_encode(x, W, b_enc, b_dec, 3)
    v_fp32, _ = dispatch.topk_encode(x, W, b_enc, b_dec, 3)
    v_bf16, i_bf16 = dispatch.topk_encode(x, W, b_enc, b_dec, 3, compute_dtype=torch.bfloat16)
    assert seen == [(torch.bfloat16,) * 2, (torch.float32,) * 2, (torch.bfloat16,) * 2]
    assert v_auto.dtype == torch.float32
    assert torch.equal(v_auto, v_bf16) and torch.equal(i_auto, i_bf16)  # the same computation


def test_encode_at_matches_reference():
    B, d, n, k = 9, 21, 40, 5
    inputs = _inputs(B, d, n, seed=17)
    idx = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(r))[:k] for r in range(B)])
    grads = []
    for op in (T.encode_at, ref.encode_at):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = op(*leaves, idx)
        (out * torch.linspace(-1, 1, k)).sum().backward()
        grads.append((out.detach(), *(t.grad for t in leaves)))
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("use_abs", [False, True])
def test_topk_encode_with_aux_on_the_kernels(monkeypatch, use_abs):
    """AuxK's selection under the Triton dispatch (a second encode of the aux latents' rows)
    equals the PyTorch backend's one-pass selection: values, latent ids and gradients."""
    monkeypatch.setattr(dispatch, "_triton_backend", lambda: T)
    B, d, n, k, k_aux = 9, 21, 40, 3, 4
    inputs = _inputs(B, d, n, seed=23 + use_abs)
    ids = torch.arange(2, n, 3)
    results = []
    for backend in ("auto", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        v, i, av, ai = dispatch.topk_encode_with_aux(*leaves, k, ids, k_aux, use_abs=use_abs, backend=backend)
        order, aux_order = i.argsort(1), ai.argsort(1)  # slots are unordered: compare by latent id
        v, i, av, ai = v.gather(1, order), i.gather(1, order), av.gather(1, aux_order), ai.gather(1, aux_order)
        ((v * torch.linspace(-1, 1, k)).sum() + (av * torch.linspace(1, 2, k_aux)).sum()).backward()
        results.append((v.detach(), i, av.detach(), ai, *(t.grad for t in leaves)))
    assert dispatch.backend_for(inputs[0]) is T
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


def test_gsae_runs_on_the_kernels(monkeypatch):
    """g-SAE's gradient-weighted selection is followed by kernels.encode_at (no reference
    primitives): under the interpreter dispatch it runs the Triton kernels, and matches the
    explicit PyTorch backend."""
    from framework.losses import TrainingBatch  # noqa: PLC0415
    from framework.variants.gsae import GradientSAE  # noqa: PLC0415

    monkeypatch.setattr(dispatch, "_triton_backend", lambda: T)
    calls = []
    encode_at = T.encode_at
    monkeypatch.setattr(T, "encode_at", lambda *a, **kw: calls.append(1) or encode_at(*a, **kw))
    sae = GradientSAE(16, 48, 4, seed=3).train()
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv("SPARSEMILL_KERNELS", backend)
        sae.zero_grad()
        out = sae(x, batch=TrainingBatch(x, grad))
        out.x_hat.pow(2).sum().backward()
        results.append((out.x_hat.detach(), sae.encoder_weight.grad.clone(), sae.decoder_weight.grad.clone()))
    assert calls == [1]
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


def test_ties_select_a_valid_set_and_route_gradients():
    """Exact ties (duplicated encoder rows): any tied latent may win, but values, distinct
    indices and the gradients of whichever were chosen must be right."""
    B, d, n, k = 7, 16, 40, 6
    x, W, b_enc, b_dec = _inputs(B, d, n, seed=11)
    W = W[torch.arange(n) % 5].contiguous()  # 8 copies of 5 rows: every score is an 8-way tie
    b_enc = b_enc[torch.arange(n) % 5].contiguous()
    inputs = [x, W, b_enc, b_dec]
    for use_abs in (False, True):
        values, idx, upstream, grads = _run_encode(inputs, k, use_abs, None, deterministic=True)
        _check_topk(values, idx, _dense_pre(*inputs), k, use_abs, None, tol=1e-5)
        for mine, oracle in zip(grads, _oracle_grads(*inputs, idx, upstream, use_abs, None)):
            torch.testing.assert_close(mine.double(), oracle, atol=2e-5, rtol=1e-4)


def test_zero_and_negative_scores_order():
    """Keys must order -0.0 < +0.0 consistently and negatives below positives: with every
    pre-activation <= 0 the relu'd values are all 0 and carry no gradient."""
    B, d, n, k = 5, 16, 33, 4
    x = torch.zeros(B, d)
    W = torch.randn(n, d)
    b_enc = -torch.rand(n) - 0.1
    b_enc[3] = 0.0
    b_enc[7] = -0.0
    inputs = [x, W, b_enc, torch.zeros(d)]
    values, idx, upstream, grads = _run_encode(inputs, k, False, None, deterministic=False)
    _check_topk(values, idx, _dense_pre(*inputs), k, False, None, tol=0)
    assert (values == 0).all() and all(g.abs().max() == 0 for g in grads)


def test_bf16_inputs_compute_in_fp32():
    B, d, n, k = 9, 24, 50, 4
    inputs = _inputs(B, d, n, seed=3, dtype=torch.bfloat16)
    values, idx, upstream, grads = _run_encode(inputs, k, True, None, deterministic=False)
    assert values.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    x, W, b_enc, b_dec = inputs
    pre = ((x - b_dec).double() @ W.double().T) + b_enc.double()  # the bf16-centred input, exactly
    _check_topk(values.float(), idx, pre, k, True, None, tol=1e-2)
    oracle = _oracle_grads(x - b_dec, W, b_enc, torch.zeros_like(b_dec), idx, upstream, True, None)
    for mine, want in zip(grads, oracle):  # grad wrt the centred input is grad x and -grad b_dec
        torch.testing.assert_close(mine.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("deterministic", [False, True])
def test_frozen_encoder_weight_still_gives_bias_grads(deterministic):
    inputs = _inputs(5, 16, 30, seed=9)
    x, W, b_enc, b_dec = [t.clone().requires_grad_(i != 1) for i, t in enumerate(inputs)]
    values, idx = T.topk_encode(x, W, b_enc, b_dec, 3, deterministic=deterministic)
    upstream = torch.randn(values.shape)
    (values * upstream).sum().backward()
    assert W.grad is None
    oracle = _oracle_grads(*inputs, idx, upstream, False, None)
    for mine, want in zip((x.grad, b_enc.grad, b_dec.grad), (oracle[0], oracle[2], oracle[3])):
        torch.testing.assert_close(mine.double(), want, atol=2e-5, rtol=1e-4)


def test_deterministic_backward_is_bitwise_reproducible():
    inputs = _inputs(13, 21, 60, seed=8)
    runs = [_run_encode(inputs, 7, False, None, deterministic=True) for _ in range(2)]
    for a, b in zip(runs[0][3], runs[1][3]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# sparse decode


def _decode_inputs(B, k, n, d_out, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (B, k), generator=g)
    idx[0, : min(k, 3)] = 2  # duplicates within a row and across rows
    idx[1, 0] = 2
    values = torch.randn(B, k, generator=g)
    values[values.abs() < 0.3] = 0.0
    W = torch.randn(n, d_out, generator=g)
    return values.to(dtype), idx, W.to(dtype)


@pytest.mark.parametrize(
    "B,k,n,d_out,deterministic",
    [(19, 5, 31, 37, False), (19, 5, 31, 37, True), (6, 1, 9, 70, True), (3, 19, 23, 16, False)],
)
def test_sparse_decode_matches_references(B, k, n, d_out, deterministic):
    values, idx, W = _decode_inputs(B, k, n, d_out, seed=B + k + n)
    v = values.clone().requires_grad_()
    w = W.clone().requires_grad_()
    out = T.sparse_decode(v, idx, w, deterministic=deterministic)
    upstream = torch.randn(B, d_out)
    (out * upstream).sum().backward()
    v64 = values.double().requires_grad_()
    w64 = W.double().requires_grad_()
    out64 = (v64.unsqueeze(2) * w64[idx]).sum(1)  # dense float64 oracle
    (out64 * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
    vr = values.clone().requires_grad_()
    wr = W.clone().requires_grad_()
    (ref.sparse_decode(vr, idx, wr) * upstream).sum().backward()
    torch.testing.assert_close(v.grad, vr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-5, rtol=1e-5)


def test_sparse_decode_bf16():
    values, idx, W = _decode_inputs(7, 4, 15, 24, seed=1, dtype=torch.bfloat16)
    v = values.clone().requires_grad_()
    w = W.clone().requires_grad_()
    out = T.sparse_decode(v, idx, w, deterministic=True)
    out64 = (values.double().unsqueeze(2) * W.double()[idx]).sum(1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), out64, atol=3e-2, rtol=1e-2)
    out.float().sum().backward()
    assert v.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(v.grad.double(), W.double()[idx].sum(2), atol=5e-2, rtol=1e-2)


def test_vec_mat_reduction():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(201, generator=g)
    W = torch.randn(201, 45, generator=g)
    torch.testing.assert_close(T.vec_mat(v, W).double(), v.double() @ W.double(), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# dispatch


def test_dispatch_routes_cpu_tensors_to_triton_under_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_backend", lambda: T)
    x, W, b_enc, b_dec = _inputs(5, 16, 30, seed=4)
    assert dispatch.backend_for(x) is T
    assert dispatch.backend_for(x, "torch") is ref
    v, i = dispatch.topk_encode(x, W, b_enc, b_dec, 3, deterministic=True)
    tv, ti = T.topk_encode(x, W, b_enc, b_dec, 3)
    assert torch.equal(v, tv) and torch.equal(i, ti)
    assert torch.equal(dispatch.sparse_decode(v, i, W), T.sparse_decode(v, i, W))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dispatch.backend_for(x) is ref
    with pytest.raises(RuntimeError):
        dispatch.backend_for(x, "triton")


def test_dispatch_backend_selection(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setattr(dispatch, "_triton_backend", lambda: T)
    monkeypatch.setenv("SPARSEMILL_KERNELS", "torch")
    assert dispatch.backend_for(x) is ref  # explicit PyTorch backend, even under the interpreter
    assert dispatch.backend_for(x, "triton") is T  # the argument wins over the environment
    monkeypatch.setenv("SPARSEMILL_KERNELS", "tritonn")
    with pytest.raises(ValueError, match="SPARSEMILL_KERNELS"):
        dispatch.backend_for(x)


def test_dispatch_fails_loudly_on_cuda_without_triton(monkeypatch):
    """CUDA tensors with a triton that does not import: a clear error, not a silent fallback to
    the reference's slow GPU path; backend='torch' remains the explicit way to use it."""
    import types  # noqa: PLC0415

    cuda_like = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    monkeypatch.setattr(dispatch, "_triton_backend", lambda: None)
    monkeypatch.setattr(dispatch, "_TRITON_ERROR", [ImportError("libcuda.so: cannot open shared object file")])
    monkeypatch.delenv("SPARSEMILL_KERNELS", raising=False)
    with pytest.raises(RuntimeError, match="triton failed to import.*libcuda.*backend='torch'"):
        dispatch.backend_for(cuda_like)
    assert dispatch.backend_for(cuda_like, "torch") is ref
    monkeypatch.setenv("SPARSEMILL_KERNELS", "torch")
    assert dispatch.backend_for(cuda_like) is ref

