"""Worker for tests/test_tensor_parallel.py: one rank of a gloo job on CPU.

    python tests/workers/tp_worker.py MODE RANK WORLD PORT OUT_DIR

Each rank runs the sharded model and saves what it saw (x_hat, its codes, gradients gathered
to full size, weights, the collectives it issued) to OUT_DIR/rank{RANK}.pt; the test process
computes the single-device reference with the same case builders and compares.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.kinds import build_sae  # noqa: E402
from worker_results import save_result  # noqa: E402
from framework.losses import normalized_mse  # noqa: E402

# name -> (kind, B, d_in, d_out or None, n_latents, k, x_requires_grad, mask_fraction or None)
GRAD_CASES = {}
for _kind in ("topk", "abstopk"):
    for _n, _d, _B, _ks in ((6, 5, 7, (1, 2, 5)), (66, 8, 16, (1, 12, 40, 66))):
        for _k in _ks:
            GRAD_CASES[f"{_kind}_n{_n}_k{_k}"] = (_kind, _B, _d, None, _n, _k, True, None)
    GRAD_CASES[f"{_kind}_masked"] = (_kind, 12, 8, None, 66, 16, True, 0.3)
    GRAD_CASES[f"{_kind}_transcoder"] = (_kind, 10, 6, 9, 30, 7, True, None)
GRAD_CASES["topk_train_path"] = ("topk", 16, 8, None, 66, 12, False, None)  # x without grad
NEGATIVE_CASES = {"broken_copy": "topk_n66_k12", "broken_select": "abstopk_n66_k12"}
# encode_rows (AuxK's selection among given latents), n=66 on 2 shards of 33: name -> (kind, rows, k)
ROWS_CASES = {
    "topk_rows_both_shards": ("topk", list(range(0, 66, 3)), 5),
    "abstopk_rows_first_shard_only": ("abstopk", list(range(3, 13)), 5),  # shard 1 has none
    "topk_rows_fewer_than_k": ("topk", [2, 40], 2),  # one row per shard: candidates padded
}
ADAM = {"steps": 5, "B": 24, "d": 8, "n": 66, "k": 6, "k_aux": 4, "lr": 2e-2, "clip": 0.3}
MESH = {"dp": 2, "tp": 2, "B": 16, "d": 8, "n": 34, "k": 5}


def make_case(name: str):
    """(full SAE in float64 with non-trivial biases, x, y, per-latent loss weights, mask)."""
    kind, B, d, d_out, n, k, x_grad, mask_frac = GRAD_CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    sae = build_sae(kind, d, n, k, d_out=d_out, seed=3).double()
    with torch.no_grad():
        sae.encoder_bias.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.2)
        sae.b_dec.copy_(torch.randn(sae.d_out, generator=g, dtype=torch.float64) * 0.3)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    y = x.clone() if d_out is None else torch.randn(B, d_out, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    mask = None if mask_frac is None else torch.rand(n, generator=g) < mask_frac
    return sae, x.requires_grad_(x_grad), y, w, mask


def case_loss(x_hat, values, indices, y, w):
    """A replicated term of x_hat plus a per-shard term of the codes (summed over shards)."""
    return normalized_mse(x_hat, y) + 0.1 * (values * w[indices]).sum()


def make_rows_case(name: str):
    """(case of make_case with x not requiring grad, as in training; rows; k) for encode_rows."""
    kind, rows, k = ROWS_CASES[name]
    sae, x, y, w, _ = make_case(f"{kind}_n66_k12")
    return (sae, x.detach(), y, w), torch.tensor(rows), k


def make_batches(seed: int, steps: int, B: int, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g, dtype=torch.float64) * 1.5 + 0.2 for _ in range(steps)]


def adam_model(kind: str):
    sae = build_sae(kind, ADAM["d"], ADAM["n"], ADAM["k"], seed=5).double()
    with torch.no_grad():
        sae.encoder_bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    dead = torch.arange(ADAM["n"]) % 3 == 1  # a fixed "dead" set for AuxK
    return sae, dead


# -- workers ------------------------------------------------------------------------------
def _codes_full(tp, shard, values, indices):
    """All shards' slots [B, W*k_loc] (global ids), for comparison only."""
    v = tp.gather_tensor(values.detach().T, shard.group, shard.world).T
    i = tp.gather_tensor(indices.T, shard.group, shard.world).T
    return v, i


def _run_case(tp, name, group):
    sae, x, y, w, mask = make_case(name)
    shard = tp.from_full(sae, group=group)
    with tp.CommCounter() as comm:
        if mask is None:
            out = shard(x)
            x_hat, values, indices = out.x_hat, out.values, out.indices
        else:  # the AuxK path: masked selection, decode without b_dec
            values, indices = shard.encode(x, latent_mask=mask[shard.start : shard.end])
            x_hat = shard.decode(values, indices, with_bias=False)
        loss = case_loss(x_hat, values, indices, y, w)
        loss.backward()
    v_full, i_full = _codes_full(tp, shard, values, indices)
    grads = {n: tp.gather_tensor(getattr(shard, n).grad, group, shard.world)
             for n in ("encoder_weight", "encoder_bias", "decoder_weight")}
    grads["b_dec"] = shard.b_dec.grad.clone()
    if x.requires_grad:
        grads["x"] = x.grad.clone()
    return {"x_hat": x_hat.detach(), "values": v_full, "indices": i_full, "grads": grads,
            "comm": comm.ops, "k_loc": values.shape[1]}


def _run_rows(tp, name):
    (sae, x, y, w), rows, k = make_rows_case(name)
    shard = tp.from_full(sae)
    values, indices = shard.encode_rows(x, rows, k)
    e_hat = shard.decode(values, indices, with_bias=False)
    case_loss(e_hat, values, indices, y, w).backward()
    v_full, i_full = _codes_full(tp, shard, values, indices)
    grad = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # noqa: E731  (no rows here: unused)
    grads = {n: tp.gather_tensor(grad(getattr(shard, n)), None, shard.world)
             for n in ("encoder_weight", "encoder_bias", "decoder_weight")}
    grads["b_dec"] = shard.b_dec.grad.clone()
    return {"x_hat": e_hat.detach(), "values": v_full, "indices": i_full, "grads": grads}


def run_grads(rank, world):
    import framework.tensor_parallel as tp  # noqa: PLC0415

    result = {name: _run_case(tp, name, None) for name in GRAD_CASES}
    result |= {name: _run_rows(tp, name) for name in ROWS_CASES}

    # export round trip: gather_full on every rank, and to dst=0 only
    sae, *_ = make_case("abstopk_transcoder")
    shard = tp.from_full(sae)
    full = tp.gather_full(shard)
    only0 = tp.gather_full(shard, dst=0)
    result["roundtrip"] = {"state": {k: v.clone() for k, v in full.state_dict().items()},
                           "kind": type(full).__name__, "dst_none": only0 is None,
                           "transcoder": full.is_transcoder}

    # negative controls: the comparison must notice a missing collective
    def no_reduce_backward(ctx, *grads):
        return (None, *grads)

    orig_backward = tp._CopyToShards.backward
    tp._CopyToShards.backward = staticmethod(no_reduce_backward)
    try:
        result["broken_copy"] = _run_case(tp, NEGATIVE_CASES["broken_copy"], None)
    finally:
        tp._CopyToShards.backward = orig_backward
    orig_keep = tp._global_keep
    tp._global_keep = lambda score, *a, **kw: torch.ones_like(score, dtype=torch.bool)
    try:
        result["broken_select"] = _run_case(tp, NEGATIVE_CASES["broken_select"], None)
    finally:
        tp._global_keep = orig_keep
    return result


def _adam_sharded(tp, kind, group):
    sae, dead = adam_model(kind)
    shard = tp.from_full(sae, group=group)
    opt = torch.optim.Adam(shard.parameters(), lr=ADAM["lr"])
    dead_local = dead[shard.start : shard.end]
    n_dead = shard.tp_sum(dead_local.sum())  # global count from the local masks
    norms = []
    for x in make_batches(11, ADAM["steps"], ADAM["B"], ADAM["d"]):
        out = shard(x)
        fvu = normalized_mse(out.x_hat, x)
        values, indices = shard.encode(x, ADAM["k_aux"], latent_mask=dead_local)
        e_hat = shard.decode(values, indices, with_bias=False)
        aux = min(n_dead.item() / ADAM["k_aux"], 1.0) * normalized_mse(e_hat, (x - out.x_hat).detach())
        loss = fvu + aux / 32
        opt.zero_grad()
        loss.backward()
        shard.project_decoder_grad()
        norms.append(shard.clip_grad_norm_(ADAM["clip"]).item())
        opt.step()
        shard.renorm_decoder()
    full = tp.gather_full(shard)
    return {"state": {k: v.clone() for k, v in full.state_dict().items()}, "norms": norms}


def run_mesh(rank, world):
    import framework.tensor_parallel as tp  # noqa: PLC0415

    dp_group, tp_group, mesh = tp.init_mesh(MESH["dp"], MESH["tp"])
    dp_index = mesh.get_local_rank("dp")
    sae = build_sae("topk", MESH["d"], MESH["n"], MESH["k"], seed=7).double()
    shard = tp.from_full(sae, group=tp_group)
    x = make_batches(21, MESH["dp"], MESH["B"], MESH["d"])[dp_index]  # same batch within a tp group
    loss = normalized_mse(shard(x).x_hat, x)
    loss.backward()
    shard.sync_data_parallel_grads(dp_group)
    grads = {n: tp.gather_tensor(getattr(shard, n).grad, tp_group, shard.world)
             for n in ("encoder_weight", "encoder_bias", "decoder_weight")}
    grads["b_dec"] = shard.b_dec.grad.clone()
    # (no optimizer here: torch.optim's first use imports torch._dynamo, seconds per process;
    # Adam is elementwise, so equal gradients give equal steps - tested on 2 ranks)
    return {"grads": grads, "dp_index": dp_index, "tp_rank": shard.rank, "start": shard.start}


def main():
    mode, rank, world, port, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        if mode == "tp2":  # one job for all 2-shard checks: process start-up dominates their cost
            import framework.tensor_parallel as tp  # noqa: PLC0415

            result = run_grads(rank, world)
            result["adam"] = {kind: _adam_sharded(tp, kind, None) for kind in ("topk", "abstopk")}
        elif mode == "mesh":
            result = run_mesh(rank, world)
        else:
            raise SystemExit(f"unknown mode {mode}")
        save_result(result, os.path.join(out_dir, f"rank{rank}"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
