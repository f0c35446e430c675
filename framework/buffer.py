"""Mixing buffer: decorrelates tokens of the same sequence before they form SAE batches.

Activations arrive in sequence order; consecutive tokens are highly correlated. The buffer
holds `capacity` tokens on the training device, and each time it is full it shuffles and
emits half of them as batches, keeping the other half to mix with what comes next.
"""

from __future__ import annotations

from typing import Iterator

import torch

Batch = dict[str, torch.Tensor]


class MixingBuffer:
    def __init__(self, capacity: int, batch_size: int, seed: int, device: torch.device):
        if capacity < batch_size:
            raise ValueError(f"buffer capacity {capacity} < batch size {batch_size}")
        self.capacity, self.batch_size = capacity, batch_size
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.device = device
        self.pending: list[Batch] = []  # concatenated only when emitting: one copy per refill
        self.rows = 0

    def _append(self, acts: Batch) -> None:
        self.pending.append(acts)
        self.rows += next(iter(acts.values())).shape[0]

    def _emit(self, n_rows: int) -> Iterator[Batch]:
        perm = torch.randperm(self.rows, generator=self.generator).to(self.device)
        store = {k: torch.cat([p[k] for p in self.pending])[perm] for k in self.pending[0]}
        n_rows -= n_rows % self.batch_size
        self.pending = [{k: v[n_rows:] for k, v in store.items()}]
        self.rows -= n_rows
        for start in range(0, n_rows, self.batch_size):
            yield {k: v[start:start + self.batch_size] for k, v in store.items()}

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """Shuffled batches of exactly batch_size tokens; an unfinished tail is dropped at the
        end of a finite stream."""
        for acts in stream:
            self._append(acts)
            if self.rows >= self.capacity:
                yield from self._emit(max(self.capacity // 2, self.batch_size))
        if self.rows >= self.batch_size:
            yield from self._emit(self.rows)
