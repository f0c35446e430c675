"""Matryoshka SAEs (Bussmann et al. / Nabeshima 2025): nested dictionaries. Latents [0, m) form
a complete SAE for every prefix size m in a fixed list; the loss sums the reconstruction error
of every prefix, so early latents learn general features and later ones refine them.
Selection is TopK or BatchTopK (option `selection`). Math: framework/variants/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from framework.sae import SAE_KINDS, SAEOutput
from framework.variants.choice import BatchTopKOptions, BatchTopKSAE
from framework.variants.common import require

SELECTIONS = ("topk", "batchtopk")


@dataclass
class MatryoshkaOptions(BatchTopKOptions):
    prefixes: list[int] = field(default_factory=list)  # increasing prefix sizes < n_latents; n_latents is implied; [] = [n/16, n/4]
    selection: str = "topk"  # topk | batchtopk (then inference uses the learned threshold, export jumprelu)

    def __post_init__(self):
        super().__post_init__()
        require(self.selection in SELECTIONS, f"options.selection: '{self.selection}' is not one of {list(SELECTIONS)}")
        require(all(p > 0 for p in self.prefixes), "options.prefixes: sizes must be > 0")
        require(all(a < b for a, b in zip(self.prefixes, self.prefixes[1:])), "options.prefixes: must be strictly increasing")


@SAE_KINDS.register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    Options = MatryoshkaOptions

    def __init__(self, d_in, n_latents, k, d_out=None, seed=0, options=None):
        super().__init__(d_in, n_latents, k, d_out=d_out, seed=seed, options=options)
        given = list(self.options.prefixes) or sorted({max(1, n_latents // 16), max(1, n_latents // 4)})
        require(all(p < n_latents for p in given) or given == [n_latents],
                f"options.prefixes: sizes must be < n_latents={n_latents} (the full size is implied), got {given}")
        self.prefix_sizes = [p for p in given if p < n_latents] + [n_latents]

    @property
    def variable_l0(self) -> bool:  # noqa: D102
        return self.options.selection == "batchtopk"

    def batch_level_selection(self) -> bool:
        return self.options.selection == "batchtopk"

    @property
    def export_architecture(self) -> str:  # noqa: D102
        return "topk" if self.options.selection == "topk" else "jumprelu"

    def select_train(self, x, k):
        return self.encode(x, k) if self.options.selection == "topk" else super().select_train(x, k)

    def select_inference(self, x, k):
        return self.encode(x, k) if self.options.selection == "topk" else super().select_inference(x, k)

    def prefix_reconstruction(self, values: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        """The reconstruction by latents [0, size) of the selected ones (b_dec included)."""
        inside = indices < size
        return self.decode(torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device)), indices)

    def extra_losses(self, x, out: SAEOutput, batch):
        # the trainer's FVU term is the full-size prefix; add every smaller one
        batch = self.training_batch(x, batch)
        terms = [batch.normalized_mse(self.prefix_reconstruction(out.values, out.indices, m))
                 for m in self.prefix_sizes[:-1]]
        return {"matryoshka": torch.stack(terms).sum()} if terms else {}

    def after_step(self, out: SAEOutput) -> None:
        if self.options.selection == "batchtopk":
            super().after_step(out)

    def export_extra(self, input_scale, output_scale):
        return super().export_extra(input_scale, output_scale) if self.options.selection == "batchtopk" else {}

    def load_export_extra(self, tensors):
        if self.options.selection == "batchtopk":
            super().load_export_extra(tensors)
