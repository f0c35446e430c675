// The Python module of kernels/cpu_ext.py's extension (declarations: cpu_ops.h).
#include "cpu_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_topk", &select_topk, "fused CPU TopK selection (kernels/cpu_topk.cpp)");
  m.def("gather_dot", &gather_dot, "<vectors[b], table[indices[b, j]]> (kernels/cpu_sparse.cpp)");
  m.def("scatter_outer", &scatter_outer, "G^T @ rows, G sparse [B, n_latents] (kernels/cpu_sparse.cpp)");
  m.def("project_out_radial", &project_out_radial, "grad - <grad, w> w per row (kernels/cpu_sparse.cpp)");
}
