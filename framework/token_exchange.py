"""Cross-rank token exchange for the mixing buffer (`train.exchange_tokens`).

Why: under data parallelism each rank reads its own share of the documents, so without it
every SAE batch of a rank (its 1/D of the global batch) holds tokens of that rank's documents
only. With it, at every refill of the buffer each rank sends near-equal random chunks of the
rows it is about to emit to every data-parallel rank and emits what it receives, shuffled
again: each rank's batches mix tokens of all D ranks' documents, as one process's buffer would.

When: refills are scheduled by steps. Every rank emits the same fixed number of rows per
refill (framework/buffer.py), so its regular refills fall on the same step everywhere. Only
the end of a finite stream may not (the last refill emits what is left): each refill first
agrees that every rank refills the same number of rows (one all_reduce of 2 int64), and
otherwise every rank mixes locally, for that refill only. A rank whose stream has ended takes
part in no later refill, so ranks whose streams end at different refills wait for it until
dist.timeout_s, as their SAE steps' collectives would. Training streams never end (the sources
start another epoch), so all this concerns finite streams only.

Exactly what: rank r splits its n rows (already shuffled) into D chunks of near-equal sizes
s_0 >= ... >= s_{D-1} (sum n) and sends s[(r + j) % D] rows to rank j. Rank r then receives
s[(j + r) % D] rows from each rank j, n rows in all, so every rank emits exactly n rows per
refill, as without the exchange. No row is lost or duplicated. Rows the refill does not emit
stay in that rank's buffer and mix into later refills. The exchange keeps no state: the
buffer's checkpointed rows and generator still make a resume exact.

Volume per refill and rank: one all_to_all_single of every site packed as bytes, sending and
receiving n x (sum over sites of width x dtype bytes) x (D-1)/D (the own chunk stays). Here
n = max(train.buffer_tokens / (2 D), B/D), rounded down to a multiple of the per-rank batch, and
refills come every n / (B/D) steps. Per step that is one per-rank batch, (B/D) x row bytes x
(D-1)/D: each token crosses the network about once. For example D = 8, buffer_tokens 32768,
one 576-wide float32 site: 2048 rows x 2304 B x 7/8 = 4.1 MB per rank every 16 steps at
B = 1024. Under latent sharding the exchange runs over the data-parallel group only. The
shard ranks of a group hold identical rows and generators, so they send and receive
identical rows and their batches stay identical.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

Batch = dict[str, torch.Tensor]

log = logging.getLogger("sparsemill")


def near_equal_split(n: int, parts: int) -> list[int]:
    """n as `parts` sizes that differ by at most one, largest first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def chunk_sizes(n: int, rank: int, world: int) -> list[int]:
    """Rows rank `rank` sends to (and receives from) each rank j, when every rank sends n:
    s[(rank + j) % world] both ways, so each rank sends and receives n rows in all."""
    s = near_equal_split(n, world)
    return [s[(rank + j) % world] for j in range(world)]


class TokenExchange:
    """Moves the rows of one refill between the ranks of a data-parallel process group
    (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def all_refill(self, n_rows: int, device: torch.device) -> bool:
        """Every rank of the group refills n_rows > 0 rows now (a collective: every rank calls
        it at every refill, also at its stream's end)."""
        bounds = torch.tensor([n_rows, -n_rows], dtype=torch.long, device=device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.group)
        return n_rows > 0 and int(bounds[0]) == -int(bounds[1])

    def swap(self, rows: Batch) -> Batch:
        """This rank's rows out in near-equal chunks, one per rank; the rows every rank sent
        here in, in rank order (the caller shuffles them). The sites travel packed as bytes in
        one all_to_all_single, so a row keeps its sites together."""
        keys = sorted(rows)  # the same order on every rank
        n = next(iter(rows.values())).shape[0]
        as_bytes = [rows[k].contiguous().reshape(n, -1).view(torch.uint8) for k in keys]
        widths = [b.shape[1] for b in as_bytes]
        splits = chunk_sizes(n, self.rank, self.world)
        sent = torch.cat(as_bytes, dim=1)
        received = sent.new_empty(sent.shape)  # n rows in, as many as out
        dist.all_to_all_single(received, sent, output_split_sizes=splits, input_split_sizes=splits, group=self.group)
        out, col = {}, 0
        for k, w in zip(keys, widths):
            v = rows[k]
            out[k] = received[:, col:col + w].contiguous().view(v.dtype).reshape(n, *v.shape[1:])
            col += w
        return out


def build(enabled: bool, dp_group: dist.ProcessGroup | None, dp_world: int) -> TokenExchange | None:
    """The run's exchange over its data-parallel group, or None (off, or one data-parallel
    rank, where there is nothing to exchange)."""
    if not enabled:
        return None
    if dp_world == 1:
        log.warning("train.exchange_tokens: one data-parallel rank, nothing to exchange; the option does nothing")
        return None
    return TokenExchange(dp_group)
