"""sparsemill's kernels: TopK encode and sparse decode, with one dispatch point.

`topk_encode` (`topk_encode_with_aux`: with AuxK's selection), `encode_at` and `sparse_decode`
pick the backend from the tensors' device (see `kernels.dispatch`); `kernels.reference` holds
the PyTorch semantics every backend matches. `project_out_radial` (the decoder gradient's
tangential part) has a C++ CPU path and a PyTorch one.
"""

SPARSEMILL_KERNELS = True  # marker: lets framework/ detect a foreign package named `kernels`

from kernels.dispatch import encode_at, sparse_decode, topk_encode, topk_encode_with_aux  # noqa: E402
from kernels.reference import project_out_radial  # noqa: E402

__all__ = ["topk_encode", "topk_encode_with_aux", "encode_at", "sparse_decode", "project_out_radial",
           "SPARSEMILL_KERNELS"]
