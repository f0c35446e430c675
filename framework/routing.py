"""Layer-distributed SAEs: each rank owns whole SAEs; after every LLM forward the activations
of each site are sent to the ranks that own an SAE reading it.

Every rank runs the frozen LLM on its own share of the documents. One `all_to_all_single`
per LLM batch moves each site's rows to their owners (after a tiny all-gather of row counts),
never collectives inside forward hooks. Every rank receives every rank's rows for its sites,
so all ranks see the same number of tokens and their buffers and steps stay in lockstep; a
rank whose (finite, eval) stream ends keeps taking part with zero rows until all have ended.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from framework.errors import ConfigError

Batch = dict[str, torch.Tensor]


def assign_owners(sae_names: list[str], world: int) -> dict[str, int]:
    """Round-robin: SAE i lives on rank i % world."""
    if world > len(sae_names):
        raise ConfigError(
            f"dist.sae_placement=layer: {world} ranks but only {len(sae_names)} SAEs; every rank must own one "
            "(use fewer processes or dist.sae_placement=replicated)")
    return {name: i % world for i, name in enumerate(sae_names)}


def route(stream: Iterator[Batch], sites_of_rank: list[list[str]], dims: dict[str, int], rank: int,
          world: int, device: torch.device) -> Iterator[Batch]:
    """This rank's local batches in, batches of the sites this rank needs (rows from all ranks) out."""
    widths = [sum(dims[s] for s in sites) for sites in sites_of_rank]
    mine = sites_of_rank[rank]
    it = iter(stream)
    while True:
        local = next(it, None)
        n_local = 0 if local is None else next(iter(local.values())).shape[0]
        counts = torch.zeros(world, dtype=torch.long, device=device)
        counts[rank] = n_local
        dist.all_reduce(counts)
        if int(counts.sum()) == 0:
            return
        send = []
        for j, sites in enumerate(sites_of_rank):
            if n_local and sites:
                send.append(torch.cat([local[s] for s in sites], dim=1).reshape(-1))
            else:
                send.append(torch.empty(0, device=device))
        recv = torch.empty(int(counts.sum()) * widths[rank], device=device)
        dist.all_to_all_single(recv, torch.cat(send), output_split_sizes=[int(c) * widths[rank] for c in counts],
                               input_split_sizes=[n_local * w for w in widths])
        rows = recv.view(-1, widths[rank])
        out, col = {}, 0
        for s in mine:
            out[s] = rows[:, col:col + dims[s]]
            col += dims[s]
        yield out


class RoutedSource:
    """Wraps an activation source so that `batches(split)` yields this rank's sites, routed."""

    def __init__(self, source, sites_of_rank: list[list[str]], rank: int, world: int):
        self.source, self.sites_of_rank, self.rank, self.world = source, sites_of_rank, rank, world
        self.dims = {s: source.dims[s] for s in sites_of_rank[rank]}

    def batches(self, split: str = "train") -> Iterator[Batch]:
        return route(self.source.batches(split), self.sites_of_rank, self.source.dims, self.rank, self.world,
                     self.source.device)

    def __getattr__(self, name):  # model, tokenizer, sequences, specials... for splice metrics
        return getattr(self.source, name)
