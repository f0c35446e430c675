"""sparsemill's kernels: TopK encode and sparse decode, with one dispatch point.

`topk_encode` and `sparse_decode` pick the backend from the tensors' device (see
`kernels.dispatch`); `kernels.reference` holds the PyTorch semantics every backend matches.
"""

SPARSEMILL_KERNELS = True  # marker: lets framework/ detect a foreign package named `kernels`

from kernels.dispatch import encode_at, sparse_decode, topk_encode  # noqa: E402

__all__ = ["topk_encode", "encode_at", "sparse_decode", "SPARSEMILL_KERNELS"]
