"""The cross-rank token exchange of the mixing buffer (`train.exchange_tokens`,
framework/token_exchange.py). On 2 gloo ranks (and a 2 x 2 latent-shard mesh) whose rows are
tagged with the rank and document they came from, every batch mixes both ranks' documents,
every row is emitted once, and the ends of finite streams neither hang nor lose rows. A 2-rank
training run resumed from a mid-way checkpoint ends bitwise where the uninterrupted one does.
Bad configurations fail naming the key."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework import token_exchange
from framework.config import ConfigError, load_config
from framework.token_exchange import chunk_sizes

WORKER = Path(__file__).parent / "workers" / "exchange_worker.py"
BATCH, PER_REFILL = 32, 4  # the worker's per-rank batch and batches per refill


def _torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _worker_results(tmp_path_factory, nproc: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"exchange{nproc}")
    _torchrun(nproc, str(WORKER), str(out))
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(nproc)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return _worker_results(tmp_path_factory, 2)


def _source_rank(ids: torch.Tensor) -> torch.Tensor:
    return ids // 1_000_000  # the worker's row id: rank * 10^6 + document * 10^3 + row


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_chunks_send_and_receive_every_refills_rows(world):
    for n in range(0, 3 * world + 2):
        sizes = [chunk_sizes(n, r, world) for r in range(world)]
        for r in range(world):
            assert sum(sizes[r]) == n  # sent
            assert sum(sizes[j][r] for j in range(world)) == n  # received
            assert all(sizes[r][j] == sizes[j][r] for j in range(world))  # one split list serves both ways
            assert max(sizes[r]) - min(sizes[r]) <= 1


@pytest.mark.slow
def test_every_batch_mixes_both_ranks_documents_and_no_row_is_lost(two_ranks):
    """With the exchange every batch of each rank holds rows of both ranks' documents; each
    refill's rows over both ranks are distinct, and all rows taken from the streams are either
    emitted once or still in a buffer. Without it, a rank's batches hold its own rows only."""
    for r, res in enumerate(two_ranks):
        off = _source_rank(res["off.emitted"])
        assert (off == r).all()
        on = _source_rank(res["on.emitted"])
        assert on.shape == (24, BATCH) and ((on == 0).any(1) & (on == 1).any(1)).all()
    emitted = torch.cat([res["on.emitted"] for res in two_ranks], 1)  # [batches, both ranks' rows]
    for k in range(0, emitted.shape[0], PER_REFILL):
        refill = emitted[k:k + PER_REFILL].flatten()
        assert refill.unique().numel() == refill.numel() == 2 * PER_REFILL * BATCH
    seen = torch.cat([emitted.flatten()] + [res["on.left"] for res in two_ranks])
    consumed = torch.cat([res["on.consumed"] for res in two_ranks])
    assert seen.numel() == consumed.numel() and torch.equal(seen.sort().values, consumed.sort().values)


@pytest.mark.slow
def test_buffer_state_resumes_the_exchange_exactly(two_ranks):
    """Stopped after 10 batches (inside the 3rd refill) and continued from the buffer's saved
    state by a new buffer on every rank: the same batches as without the stop."""
    for res in two_ranks:
        assert torch.equal(res["resumed.emitted"], res["on.emitted"])


@pytest.mark.slow
def test_finite_stream_ends_mix_locally_where_the_ranks_differ(two_ranks):
    """Ranks whose streams end at the same refill with as many rows exchange them; with
    different counts (or none at all) each mixes its own, and nothing hangs or is lost."""
    counts = {name: [res[f"{name}.emitted"].shape[0] for res in two_ranks]
              for name in ("equal_ends", "unequal_ends", "tiny_ends")}
    assert counts == {"equal_ends": [10, 10], "unequal_ends": [10, 9], "tiny_ends": [0, 1]}
    for name in counts:
        seen = torch.cat([res[f"{name}.{k}"].flatten() for res in two_ranks for k in ("emitted", "left")])
        consumed = torch.cat([res[f"{name}.consumed"] for res in two_ranks])
        assert torch.equal(seen.sort().values, consumed.sort().values), name
    for r, res in enumerate(two_ranks):
        last = _source_rank(res["equal_ends.emitted"][PER_REFILL:])  # the final refill, exchanged
        assert ((last == 0).any(1) & (last == 1).any(1)).all()
        assert (_source_rank(res["unequal_ends.emitted"][PER_REFILL:]) == r).all()  # mixed locally
    assert (_source_rank(two_ranks[1]["tiny_ends.emitted"]) == 1).all()


@pytest.mark.slow
def test_latent_shard_ranks_exchange_over_the_data_parallel_group_only(tmp_path_factory):
    """A 2 (data parallel) x 2 (latent shards) mesh: the two shard ranks of a group get
    identical batches, which mix both data-parallel ranks' documents."""
    ranks = _worker_results(tmp_path_factory, 4)
    for a, b in ((0, 1), (2, 3)):
        assert ranks[a].keys() == ranks[b].keys()
        assert all(torch.equal(ranks[a][k], ranks[b][k]) for k in ranks[a])
    for res in (ranks[0], ranks[2]):
        on = _source_rank(res["on.emitted"])
        assert ((on == 0).any(1) & (on == 1).any(1)).all()


# --------------------------------------------------------------------------- training


STEP, STEPS = 128, 12  # global batch; per rank 64 rows, 4 batches per refill of a 512-row buffer


def _run_cfg(folder: Path, acts: Path, exchange: bool) -> Path:
    cfg = {
        "run_dir": str(folder / "run"),
        "data": {"source": "activations", "activations_dir": str(acts), "shuffle_files": False},  # rank r: file r
        "saes": [{"name": "s", "n_latents": 64, "k": 4, "dead_after_tokens": 512}],
        "train": {"total_tokens": STEPS * STEP, "batch_size": STEP, "buffer_tokens": 1024, "init_tokens": 256,
                  "warmup_steps": 2, "checkpoint_every": 6, "keep_checkpoints": 3, "exchange_tokens": exchange},
        "eval": {"tokens": 256},
        "log": {"progress": False, "tensorboard": False},
        "dist": {"timeout_s": 60},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(path: Path) -> subprocess.CompletedProcess:
    return _torchrun(2, "-m", "framework", "train", str(path), "--quiet")


def _sae_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The SAE's whole saved state at `step`: weights, counters, optimizer moments."""
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "s.safetensors"))


@pytest.mark.slow
def test_two_rank_training_with_the_exchange_resumes_bitwise(tmp_path):
    """Sparse codes over a fixed dictionary, one activation file per rank (read in order, so
    rank r reads file r in every epoch). A 2-rank run with
    the exchange, and new processes resumed from its step-6 checkpoint (inside a refill: 4
    steps per refill), end with bitwise the same SAE state at step 12. Rank 1's rows are
    offset by 10, so the checkpoint's buffers show the exchange at work: the rows each rank
    has left to emit come from both ranks' files."""
    g = np.random.default_rng(0)
    acts = tmp_path / "acts"
    acts.mkdir()
    dictionary = g.standard_normal((48, 16)).astype(np.float32)
    for i in range(2):
        codes = (g.random((3000, 48)) < 0.06) * g.exponential(1.0, (3000, 48))
        np.save(acts / f"shard{i}.npy", (codes @ dictionary + 10 * i).astype(np.float32))  # one file per rank
    straight = tmp_path / "straight" / "run"
    _train(_run_cfg(tmp_path / "straight", acts, True))

    resumed = tmp_path / "resumed" / "run"
    shutil.copytree(straight, resumed)  # as the run stood when it saved step 6
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{6:08d}")
    done = _train(_run_cfg(tmp_path / "resumed", acts, True))
    assert "resuming from" in done.stderr and "step 6" in done.stderr

    a, b = _sae_tensors(straight, STEPS), _sae_tensors(resumed, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for r in range(2):
        ready = load_file(str(straight / "checkpoints" / f"step_{6:08d}" / f"rank_{r:05d}.safetensors"))
        from_rank1 = ready["buffer/ready.activations"].mean(1) > 5
        assert from_rank1.shape == (2 * STEP // 2,)  # 2 of the refill's 4 per-rank batches left
        assert from_rank1.any() and not from_rank1.all()


# --------------------------------------------------------------------------- configuration


def test_bad_configs_name_the_key(tmp_path):
    acts = tmp_path / "acts"
    acts.mkdir()
    np.save(acts / "shard0.npy", np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32))
    path = _run_cfg(tmp_path, acts, True)
    assert load_config(path).train.exchange_tokens is True
    with pytest.raises(ConfigError, match=r"train.exchange_tokens: with dist.sae_placement=layer"):
        load_config(path, ["dist.sae_placement=layer"])
    with pytest.raises(ConfigError, match=r"train.exchange_tokens: expected bool"):
        load_config(path, ["train.exchange_tokens=often"])


def test_one_data_parallel_rank_has_nothing_to_exchange(caplog):
    with caplog.at_level(logging.WARNING, logger="sparsemill"):
        assert token_exchange.build(True, None, 1) is None
    assert "nothing to exchange" in caplog.text
    assert token_exchange.build(False, None, 4) is None
