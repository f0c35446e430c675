"""Worker for tests/test_token_exchange.py (run under torchrun, gloo): mixing buffers fed by
each data-parallel rank's own documents, whose rows carry where they came from, with and
without the token exchange, the exchange stopped mid-refill and resumed from the buffer's
state, and finite streams whose ends differ between the ranks. Four ranks form a 2 (data parallel) x 2 (latent shards) mesh whose shard ranks read the
same documents. Writes each rank's emitted, consumed and left-over row ids.

    python -m torch.distributed.run --nproc_per_node=2|4 ... exchange_worker.py OUT_DIR
"""

import itertools
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from framework.buffer import MixingBuffer
from framework.tensor_parallel import init_mesh
from framework.token_exchange import TokenExchange

CAPACITY, BATCH, BATCHES, CUT = 256, 32, 24, 10  # 128 rows per refill: 4 batches, 6 refills; cut inside the 3rd


def row_ids(rank: int, doc: int, n: int) -> torch.Tensor:
    return rank * 1_000_000 + doc * 1000 + torch.arange(n)


def document(rank: int, doc: int, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Site "a" (float32) holds (rank, document, row) and noise, "b" (int64, 1-D) the row's id,
    "c" (bfloat16) (rank, document): the exchange must keep every site of a row together."""
    tags = torch.stack([torch.full((n,), float(rank)), torch.full((n,), float(doc)), torch.arange(n).float()], 1)
    return {"a": torch.cat([tags, torch.randn(n, 2, generator=g)], 1), "b": row_ids(rank, doc, n),
            "c": tags[:, :2].bfloat16()}


def documents(rank: int):
    """Rank `rank`'s documents of random lengths, forever (as the training sources)."""
    g = torch.Generator().manual_seed(1 + rank)
    for doc in itertools.count():
        yield document(rank, doc, int(torch.randint(20, 90, (1,), generator=g)), g)


def finite_documents(rank: int, lengths: list[int]):
    g = torch.Generator().manual_seed(1 + rank)
    return (document(rank, doc, n, g) for doc, n in enumerate(lengths))


def counted(stream, consumed: list):
    for item in stream:
        consumed.append(item["b"])
        yield item


def checked_ids(batch: dict) -> torch.Tensor:
    a, b, c = batch["a"], batch["b"], batch["c"]
    assert torch.equal((a[:, 0] * 1_000_000 + a[:, 1] * 1000 + a[:, 2]).long(), b)  # exact: ids < 2^24
    assert torch.equal(c.float(), a[:, :2])
    return b


def run(dp_rank: int, exchange: TokenExchange | None, docs, batches: int | None, cut: int | None = None):
    """Up to `batches` batches (None: to the stream's end) of a fresh buffer; with `cut`, a new
    buffer takes over from the first's state after `cut` batches (a resume). Emitted ids are
    [batches, BATCH]."""
    def make():
        return MixingBuffer(CAPACITY, BATCH, seed=7 + dp_rank, device=torch.device("cpu"), exchange=exchange)

    consumed: list = [torch.zeros(0, dtype=torch.long)]
    stream = counted(docs, consumed)
    buf = make()
    emitted = [checked_ids(b) for b in itertools.islice(buf.batches(stream), cut or batches)]
    if cut is not None:
        resumed = make()
        resumed.load_tensors({k: v.clone() for k, v in buf.tensors().items()})
        buf = resumed
        emitted += [checked_ids(b) for b in itertools.islice(buf.batches(stream), batches - cut)]
    state = buf.tensors()
    left = torch.cat([torch.zeros(0, dtype=torch.long)] + [state[k] for k in ("pending.b", "ready.b") if k in state])
    return {"emitted": torch.stack(emitted) if emitted else torch.zeros(0, BATCH, dtype=torch.long),
            "consumed": torch.cat(consumed), "left": left}


# the ends of finite streams (rows per document on data-parallel ranks 0 and 1): both end at their 2nd
# refill with the same number of rows (exchanged), with different numbers (mixed locally), or before the
# first with fewer than a batch (rank 0: nothing at all)
FINITE = {"equal_ends": ([40] * 8, [50] * 7), "unequal_ends": ([40] * 8, [50] * 6), "tiny_ends": ([], [40])}

dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a deadlock fails the test, not hangs it
world, rank = dist.get_world_size(), dist.get_rank()
shards = 2 if world == 4 else 1
dp_group = init_mesh(world // shards, shards)[0] if shards > 1 else None
dp_rank = rank // shards
exchange = TokenExchange(dp_group)
runs = {"off": (None, documents(dp_rank), BATCHES, None), "on": (exchange, documents(dp_rank), BATCHES, None),
        "resumed": (exchange, documents(dp_rank), BATCHES, CUT)}
runs |= {name: (exchange, finite_documents(dp_rank, lengths[dp_rank]), None, None) for name, lengths in FINITE.items()}
results = {}
for name, args in runs.items():
    results |= {f"{name}.{k}": v for k, v in run(dp_rank, *args).items()}
save_file(results, f"{sys.argv[1]}/rank{rank}.safetensors")
dist.barrier()  # no rank tears down gloo while a peer still talks to it
dist.destroy_process_group()
