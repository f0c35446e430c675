"""The process's random generators (python, numpy, torch, CUDA) as a Stateful component: seeded
once at the start of a run, saved per rank, restored exactly (or, under another world size,
from the saved rank of the same index modulo the old world)."""

from __future__ import annotations

import random

import numpy as np
import torch

from framework.stateful import Saved, State, StateDict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RNGState:
    def state_dict(self) -> StateDict:
        version, internal, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
        if torch.cuda.is_available():
            tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        meta = {"python": [version, list(internal), gauss],
                "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
        return StateDict(local=State(tensors, meta))

    def load_state_dict(self, saved: Saved) -> None:
        part = saved.mine() or saved.local[saved.rank % len(saved.local)]
        meta, tensors = part.meta, part.tensors
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
        np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
        np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[k] for k in sorted(tensors.keys()) if k.startswith("cuda.")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
