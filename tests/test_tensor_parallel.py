"""Latent-sharded (tensor-parallel) TopK SAE against the single-device model.

Real multi-process gloo jobs on CPU (tests/workers/tp_worker.py, one subprocess per rank, a free port,
a hard timeout so that a hang fails instead of blocking): a 2-shard forward + backward in
float64 equals TopKSAE's (codes as sets per row, x_hat, every gradient including b_dec and x)
for TopK and AbsTopK, k = 1 .. n, with odd shard sizes; a few Adam steps (with AuxK on a masked
selection and global gradient clipping) give the same weights; a 2 x 2 (dp, tp) mesh matches
the single-device gradient of the two batches. Negative controls show the comparisons fail when
a collective is left out.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kernels
from framework import tensor_parallel as tp
from framework.kinds import build_sae
from worker_results import load_result

_spec = importlib.util.spec_from_file_location("_tp_worker", Path(__file__).parent / "workers" / "tp_worker.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

JOB_TIMEOUT_S = 150  # whole job (all ranks); a healthy job takes a few seconds
PARAMS = ("encoder_weight", "encoder_bias", "decoder_weight", "b_dec")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, world: int, out: Path) -> list[dict]:
    """Run one job of `world` ranks; the rank results, or a test failure with their stderr."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for attempt in range(2):  # the free port may be taken between probe and bind: retry once
        port = _free_port()
        logs = [open(out / f"rank{r}.log", "w+") for r in range(world)]
        cmd = [sys.executable, str(Path(W.__file__)), mode, "RANK", str(world), str(port), str(out)]
        procs = [subprocess.Popen([str(r) if a == "RANK" else a for a in cmd], stdout=logs[r],
                                  stderr=subprocess.STDOUT, env=env) for r in range(world)]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        try:
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            pytest.fail(f"{mode} job hung for more than {JOB_TIMEOUT_S} s")
        text = []
        for lg in logs:
            lg.seek(0)
            text.append(lg.read())
            lg.close()
        if all(p.returncode == 0 for p in procs):
            return [load_result(out / f"rank{r}") for r in range(world)]
        if attempt == 0 and any("address already in use" in t.lower() for t in text):
            continue
        pytest.fail(f"{mode} job failed:\n" + "\n".join(f"--- rank {r} (rc {p.returncode})\n{t[-4000:]}"
                                                        for r, (p, t) in enumerate(zip(procs, text))))
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def grads_job(tmp_path_factory):
    """One 2-rank job runs every 2-shard check (forward/backward cases, round trip, negative
    controls, Adam runs): process start-up, not the math, is what costs here."""
    return _launch("tp2", 2, tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def adam_job(grads_job):
    return [res["adam"] for res in grads_job]


# -- single-device references -----------------------------------------------------------------
def reference(name: str) -> dict:
    sae, x, y, w, mask = W.make_case(name)
    if mask is None:
        out = sae(x)
        x_hat, values, indices = out.x_hat, out.values, out.indices
    else:
        values, indices = sae.encode(x, latent_mask=mask)
        x_hat = sae.decode(values, indices, with_bias=False)
    W.case_loss(x_hat, values, indices, y, w).backward()
    grads = {n: getattr(sae, n).grad for n in PARAMS}
    if x.requires_grad:
        grads["x"] = x.grad
    return {"x_hat": x_hat.detach(), "values": values.detach(), "indices": indices, "grads": grads}


def _codes(values: torch.Tensor, indices: torch.Tensor) -> list[dict[int, float]]:
    """Per row: latent id -> value over the active (non-zero) slots."""
    values = values.detach()
    return [{int(i): float(v) for v, i in zip(vr, ir) if v != 0} for vr, ir in zip(values, indices)]


def assert_matches(got: dict, ref: dict, what: str = "") -> None:
    got_codes, ref_codes = _codes(got["values"], got["indices"]), _codes(ref["values"], ref["indices"])
    for row, (a, b) in enumerate(zip(got_codes, ref_codes)):
        assert a.keys() == b.keys(), f"{what} row {row}: latents {sorted(a)} != {sorted(b)}"
        torch.testing.assert_close(torch.tensor([a[i] for i in sorted(a)], dtype=torch.float64),
                                   torch.tensor([b[i] for i in sorted(b)], dtype=torch.float64))
    torch.testing.assert_close(got["x_hat"], ref["x_hat"], msg=lambda m: f"{what} x_hat: {m}")
    assert got["grads"].keys() == {k for k, v in ref["grads"].items() if v is not None}
    for n, g in got["grads"].items():
        torch.testing.assert_close(g, ref["grads"][n], msg=lambda m, n=n: f"{what} grad {n}: {m}")


# -- pure functions -----------------------------------------------------------------------------
def test_shard_range_and_divisibility_error():
    assert [tp.shard_range(66, r, 2) for r in range(2)] == [(0, 33), (33, 66)]
    assert [tp.shard_range(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="n_latents=66 is not divisible by the 4 latent shards"):
        tp.shard_range(66, 0, 4)
    with pytest.raises(ValueError, match="n_latents=66 is not divisible"):
        tp.from_full(build_sae("topk", 4, 66, 3), rank=1, world=4)
    with pytest.raises(ValueError, match="outside"):
        tp.shard_range(8, 2, 2)


@pytest.mark.parametrize("kind", ["topk", "abstopk"])
def test_one_shard_is_the_plain_model(kind):
    """world = 1 (no process group): the same module is exactly TopKSAE, no collectives."""
    torch.manual_seed(0)
    sae = build_sae(kind, 6, 20, 4).double()
    with torch.no_grad():
        sae.b_dec.normal_()
    shard = tp.from_full(sae)
    x = torch.randn(9, 6, dtype=torch.float64)
    a, b = sae(x), shard(x)
    torch.testing.assert_close(a.x_hat, b.x_hat)
    assert _codes(a.values, a.indices) == _codes(b.values, b.indices)
    a.x_hat.pow(2).sum().backward()
    b.x_hat.pow(2).sum().backward()
    for n in PARAMS:
        torch.testing.assert_close(getattr(sae, n).grad, getattr(shard, n).grad)
    assert isinstance(tp.gather_full(shard), type(sae))


def test_tie_rule_keeps_exactly_k_by_value_then_global_index(monkeypatch):
    """_global_keep from the gathered values alone: with many exact ties, every simulated rank
    keeps exactly its part of the top k ordered by (score desc, global index asc)."""
    world, n_loc, k_loc, B = 3, 6, 4, 50
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (world, B, k_loc), generator=g).double()  # heavy ties
    local = torch.stack([torch.randperm(n_loc, generator=g)[:k_loc] for _ in range(world * B)]).view(world, B, k_loc)
    monkeypatch.setattr(tp, "_all_gather", lambda t, group, w: scores)
    for k in (1, 5, 7, 12):
        keep = torch.stack([tp._global_keep(scores[r], local[r], k, None, r, world) for r in range(world)])
        for b in range(B):
            cands = [(-scores[r, b, j].item(), r * n_loc + local[r, b, j].item(), r, j)
                     for r in range(world) for j in range(k_loc)]
            expected = {(r, j) for *_, r, j in sorted(cands)[:k]}
            assert {(r, j) for r in range(world) for j in range(k_loc) if keep[r, b, j]} == expected, (k, b)


# -- 2 shards vs one device ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(W.GRAD_CASES))
def test_two_shards_match_single_device(grads_job, name):
    ref = reference(name)
    r0, r1 = grads_job[0][name], grads_job[1][name]
    assert_matches(r0, ref, name)
    # replicated results are bit-identical on both ranks
    assert torch.equal(r0["x_hat"], r1["x_hat"])
    for n in r0["grads"]:
        assert torch.equal(r0["grads"][n], r1["grads"][n]), n
    _, _, _, _, n_lat, k, _, _ = W.GRAD_CASES[name]
    assert r0["k_loc"] == min(k, n_lat // 2)  # each shard offers at most k candidates


@pytest.mark.parametrize("name", list(W.ROWS_CASES))
def test_encode_rows_matches_selection_among_those_latents(grads_job, name):
    """AuxK's path: the global top k among given latents (each shard multiplying only its own
    rows, also when it has none or fewer than k), decoded without b_dec, equals the single
    device's top k on the sub-matrix of those rows, codes and every gradient."""
    (sae, x, y, w), rows, k = W.make_rows_case(name)
    values, sub = kernels.topk_encode(x, sae.encoder_weight[rows], sae.encoder_bias[rows], sae.b_dec, k,
                                      use_abs=sae.use_abs)
    x_hat = sae.decode(values, rows[sub], with_bias=False)
    W.case_loss(x_hat, values, rows[sub], y, w).backward()
    ref = {"x_hat": x_hat.detach(), "values": values.detach(), "indices": rows[sub],
           "grads": {n: getattr(sae, n).grad for n in PARAMS}}
    assert_matches(grads_job[0][name], ref, name)
    assert torch.equal(grads_job[0][name]["grads"]["b_dec"], grads_job[1][name]["grads"]["b_dec"])


def test_one_small_collective_per_step(grads_job):
    """Training path (x without grad): forward = one all_gather of the [B, k] candidate values
    + one all_reduce of x_hat; backward = one all_reduce of b_dec's d floats. Nothing else."""
    _, B, d, _, _, k, _, _ = W.GRAD_CASES["topk_train_path"]
    f8 = 8  # float64
    assert grads_job[0]["topk_train_path"]["comm"] == [
        ("all_gather", B * k * f8), ("all_reduce", B * d * f8), ("all_reduce", d * f8)]
    # with x requiring grad, x's and b_dec's encoder-path gradients share one packed all_reduce
    _, B, d, _, _, k, _, _ = W.GRAD_CASES["topk_n66_k12"]
    assert grads_job[1]["topk_n66_k12"]["comm"] == [
        ("all_gather", B * k * f8), ("all_reduce", B * d * f8), ("all_reduce", (B * d + d) * f8)]


def test_gather_full_round_trip(grads_job):
    sae, *_ = W.make_case("abstopk_transcoder")
    for rank, res in enumerate(grads_job):
        rt = res["roundtrip"]
        assert rt["kind"] == "AbsTopKSAE" and rt["transcoder"]
        assert rt["dst_none"] == (rank != 0)  # gather_full(dst=0) returns None on other ranks
        for n, v in sae.state_dict().items():
            assert torch.equal(rt["state"][n], v), n


def test_negative_controls_are_detected(grads_job):
    """The comparison is sharp: without the backward all_reduce of the encoder inputs, b_dec's
    and x's gradients differ; keeping every local candidate (no global selection) changes
    x_hat and the codes."""
    got = grads_job[0]["broken_copy"]
    ref = reference(W.NEGATIVE_CASES["broken_copy"])
    for n in ("b_dec", "x"):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got["grads"][n], ref["grads"][n])
    torch.testing.assert_close(got["grads"]["encoder_weight"], ref["grads"]["encoder_weight"])
    with pytest.raises(AssertionError):
        assert_matches(grads_job[0]["broken_select"], reference(W.NEGATIVE_CASES["broken_select"]))


# -- training steps -----------------------------------------------------------------------------
def _adam_reference(kind: str) -> dict:
    """The same loop on one device: AuxK on the dead latents' sub-matrix (as SAETrainer does),
    torch's clip_grad_norm_."""
    sae, dead = W.adam_model(kind)
    opt = torch.optim.Adam(sae.parameters(), lr=W.ADAM["lr"])
    dead_ids = dead.nonzero().squeeze(1)
    norms = []
    for x in W.make_batches(11, W.ADAM["steps"], W.ADAM["B"], W.ADAM["d"]):
        out = sae(x)
        fvu = W.normalized_mse(out.x_hat, x)
        values, sub = kernels.topk_encode(x, sae.encoder_weight[dead_ids], sae.encoder_bias[dead_ids], sae.b_dec,
                                          W.ADAM["k_aux"], use_abs=sae.use_abs)
        e_hat = sae.decode(values, dead_ids[sub], with_bias=False)
        aux = min(dead_ids.numel() / W.ADAM["k_aux"], 1.0) * W.normalized_mse(e_hat, (x - out.x_hat).detach())
        opt.zero_grad()
        (fvu + aux / 32).backward()
        with torch.no_grad():
            w, g = sae.decoder_weight, sae.decoder_weight.grad
            g -= (g * w).sum(1, keepdim=True) * w
        norms.append(torch.nn.utils.clip_grad_norm_(sae.parameters(), W.ADAM["clip"]).item())
        opt.step()
        sae.renorm_decoder()
    return {"state": sae.state_dict(), "norms": norms}


@pytest.mark.parametrize("kind", ["topk", "abstopk"])
def test_adam_steps_match_single_device(adam_job, kind):
    ref = _adam_reference(kind)
    assert max(ref["norms"]) > W.ADAM["clip"], "clipping should be active in this test"
    start = W.adam_model(kind)[0].state_dict()
    assert not torch.allclose(ref["state"]["encoder_weight"], start["encoder_weight"])  # it trained
    for res in adam_job:
        got = res[kind]
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]))
        for n in PARAMS:
            torch.testing.assert_close(got["state"][n], ref["state"][n], msg=lambda m, n=n: f"{kind} {n}: {m}")


def test_dp_x_tp_mesh_matches_single_device(tmp_path):
    """4 ranks as a (dp=2, tp=2) mesh: each dp replica a different batch, gradients averaged
    over dp = the single-device gradient of the mean of the two batch losses."""
    results = _launch("mesh", 4, tmp_path)
    cfg = W.MESH
    sae = build_sae("topk", cfg["d"], cfg["n"], cfg["k"], seed=7).double()
    batches = W.make_batches(21, cfg["dp"], cfg["B"], cfg["d"])
    loss = sum(W.normalized_mse(sae(x).x_hat, x) for x in batches) / cfg["dp"]
    loss.backward()
    for rank, res in enumerate(results):
        assert (res["dp_index"], res["tp_rank"]) == divmod(rank, cfg["tp"])  # tp groups: consecutive ranks
        assert res["start"] == res["tp_rank"] * cfg["n"] // cfg["tp"]
        for n in PARAMS:
            torch.testing.assert_close(res["grads"][n], getattr(sae, n).grad,
                                       msg=lambda m, n=n: f"rank {rank} grad {n}: {m}")
    # the two batches give different gradients: averaging over dp really happened
    one = build_sae("topk", cfg["d"], cfg["n"], cfg["k"], seed=7).double()
    W.normalized_mse(one(batches[0]).x_hat, batches[0]).backward()
    assert not torch.allclose(one.encoder_weight.grad, sae.encoder_weight.grad)
