"""The state protocol between the components of a run and the checkpoint manager (in the
manner of torchtitan's `Stateful`): each component says what it must save and restores itself
from what was saved; the manager only serialises, verifies and publishes.

A component's `state_dict()` returns a `StateDict`: a `shared` part (state that is the same
for every rank, e.g. an SAE's weights: written once, by the rank that returns it) and a
`local` part (this rank's own: its data position, mixing buffer, optimizer partition). Each
part is `State(tensors, meta)`: tensors go to safetensors, meta (JSON-able) to JSON, so
nothing is ever pickled. `load_state_dict(saved)` gets a `Saved`: the shared part and every
saved rank's local part, so a component can restore exactly (same ranks) or re-shard and merge
(another world size or placement); tensors are read lazily (slices of ZeRO partitions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch


@dataclass
class State:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class StateDict:
    shared: State | None = None  # None: this rank does not write the shared part
    local: State | None = None


@dataclass
class Loaded:
    """One saved part: `tensors` maps names to tensors loaded on access; `slice(name, lo, hi)`
    reads elements lo..hi of a flat tensor without loading it whole."""

    tensors: Mapping[str, torch.Tensor]
    meta: dict

    def slice(self, name: str, lo: int, hi: int) -> torch.Tensor:
        getter = getattr(self.tensors, "slice", None)
        return getter(name, lo, hi) if getter is not None else self.tensors[name][lo:hi]


@dataclass
class Saved:
    shared: Loaded | None  # None: the checkpoint holds no shared part of this component
    local: list[Loaded | None]  # per saved rank (None where that rank saved none)
    rank: int  # this process's rank
    same_ranks: bool  # saved by this world size and placement: `mine` is this rank's own part

    def mine(self) -> Loaded | None:
        return self.local[self.rank] if self.same_ranks and self.rank < len(self.local) else None


class Stateful(Protocol):
    def state_dict(self) -> StateDict: ...

    def load_state_dict(self, saved: Saved) -> None: ...
