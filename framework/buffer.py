"""Mixing buffer: decorrelates tokens of the same sequence before they form SAE batches.

Activations arrive in sequence order; consecutive tokens are highly correlated. The buffer
holds `capacity` tokens on the training device, and each time it is full it shuffles and
emits half of them as batches, keeping the other half to mix with what comes next.

Its whole state is explicit, so a checkpoint taken between two batches resumes exactly:
`queued` items already taken from the source but not yet mixed in (the init sample), the
`pending` rows waiting for the next shuffle, the shuffled `ready` rows not yet emitted, and
the generator (`tensors()`: a flat tensor dict; `state_dict()`: the Stateful protocol).

Under data parallelism a `TokenExchange` (framework/token_exchange.py, `train.exchange_tokens`)
trades the rows each refill makes ready between the ranks, so that every rank's batches mix
all ranks' documents. It keeps no state, so the state above still makes a resume exact.
"""

from __future__ import annotations

from typing import Iterator

import torch

from framework.stateful import Saved, State, StateDict
from framework.token_exchange import TokenExchange

Batch = dict[str, torch.Tensor]


class MixingBuffer:
    def __init__(self, capacity: int, batch_size: int, seed: int, device: torch.device,
                 exchange: TokenExchange | None = None):
        if capacity < batch_size:
            raise ValueError(f"buffer capacity {capacity} < batch size {batch_size}")
        self.capacity, self.batch_size = capacity, batch_size
        self.exchange = exchange  # None: each rank mixes its own rows only
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.device = device
        self.queued: list[Batch] = []  # taken from the source, consumed before the stream
        self.pending: list[Batch] = []  # concatenated only when emitting: one copy per refill
        self.rows = 0
        self.ready: Batch | None = None  # shuffled rows being emitted
        self.ready_pos = 0

    def push(self, items: list[Batch]) -> None:
        """Items already taken from the stream (e.g. the init sample): mixed in first."""
        self.queued.extend(items)

    def _append(self, acts: Batch) -> None:
        self.pending.append(acts)
        self.rows += next(iter(acts.values())).shape[0]

    def _permuted(self, rows: Batch, n: int) -> Batch:
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        return {k: v[perm] for k, v in rows.items()}

    def _shuffle(self, n_rows: int) -> None:
        """The next n_rows (rounded down to whole batches) become ready; with an exchange,
        every rank's share of them (the ranks agree first: at a stream's end they may differ)."""
        n_rows -= n_rows % self.batch_size
        swap = self.exchange is not None and self.exchange.all_refill(n_rows, self.device)
        if not self.pending:  # a stream that ended before its first row
            return
        store = self._permuted({k: torch.cat([p[k] for p in self.pending]) for k in self.pending[0]}, self.rows)
        self.pending = [{k: v[n_rows:] for k, v in store.items()}]
        self.rows -= n_rows
        ready = {k: v[:n_rows] for k, v in store.items()}
        if swap:  # the rows came in rank order: shuffled again
            ready = self._permuted(self.exchange.swap(ready), n_rows)
        self.ready, self.ready_pos = ready, 0

    def _drain(self) -> Iterator[Batch]:
        while self.ready is not None:
            start = self.ready_pos
            if start >= next(iter(self.ready.values())).shape[0]:
                self.ready = None
                return
            self.ready_pos = start + self.batch_size  # advanced before the yield: a checkpoint taken
            yield {k: v[start:self.ready_pos] for k, v in self.ready.items()}  # after it counts it

    def _next_item(self, stream) -> Batch | None:
        if self.queued:
            return self.queued.pop(0)
        return next(stream, None)

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """Shuffled batches of exactly batch_size tokens; an unfinished tail is dropped at the
        end of a finite stream. Continues from the buffer's current state."""
        stream = iter(stream)
        while True:
            yield from self._drain()
            if self.rows < self.capacity:  # pull only when not full: items larger than a refill
                acts = self._next_item(stream)  # (4096-row file chunks) must not pile up in pending
                if acts is None:
                    break
                self._append(acts)
            if self.rows >= self.capacity:
                self._shuffle(max(self.capacity // 2, self.batch_size))
        if self.rows >= self.batch_size or self.exchange is not None:  # the others may be refilling
            self._shuffle(self.rows)
            yield from self._drain()

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """This rank's rows and generator (a local part; framework/stateful.py)."""
        return StateDict(local=State(self.tensors()))

    def load_state_dict(self, saved: Saved) -> None:
        """Exactly where it was on the same rank of the same layout; otherwise the buffer
        starts empty (another world size or placement: the rows belonged to other ranks)."""
        mine = saved.mine()
        if mine is not None:
            self.load_tensors({k: mine.tensors[k] for k in mine.tensors.keys()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Keys: ready.<site>, pending.<site>, queued.<i>.<site>, generator, shape."""
        out: dict[str, torch.Tensor] = {
            "generator": self.generator.get_state(),
            "shape": torch.tensor([self.capacity, self.batch_size, len(self.queued)], dtype=torch.long),
        }
        cpu = lambda v: v.detach().to("cpu").contiguous()  # noqa: E731
        if self.ready is not None:
            out |= {f"ready.{k}": cpu(v[self.ready_pos:]) for k, v in self.ready.items()}
        if self.pending:
            out |= {f"pending.{k}": cpu(torch.cat([p[k] for p in self.pending])) for k in self.pending[0]}
        for i, item in enumerate(self.queued):
            out |= {f"queued.{i}.{k}": cpu(v) for k, v in item.items()}
        return out

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        capacity, batch_size, n_queued = (int(v) for v in state["shape"])
        if (capacity, batch_size) != (self.capacity, self.batch_size):
            raise ValueError(f"buffer state has capacity/batch {capacity}/{batch_size}, "
                             f"this buffer {self.capacity}/{self.batch_size}")
        self.generator.set_state(state["generator"])
        dev = lambda v: v.to(self.device)  # noqa: E731
        ready = {k[len("ready."):]: dev(v) for k, v in state.items() if k.startswith("ready.")}
        self.ready, self.ready_pos = (ready or None), 0
        pending = {k[len("pending."):]: dev(v) for k, v in state.items() if k.startswith("pending.")}
        self.pending = [pending] if pending else []
        self.rows = next(iter(pending.values())).shape[0] if pending else 0
        self.queued = [{} for _ in range(n_queued)]
        for k, v in state.items():
            if k.startswith("queued."):
                _, i, site = k.split(".", 2)
                self.queued[int(i)][site] = dev(v)
