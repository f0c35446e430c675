// The C++ CPU kernels of kernels/cpu_ext.py's extension: cpu_topk.cpp (the fused TopK
// selection) and cpu_sparse.cpp (the backward's sparse products); cpu_module.cpp binds them.
#pragma once

#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> select_topk(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    int64_t k, bool use_abs, const c10::optional<at::Tensor>& abs_mask,
                                    int64_t chunk, int64_t rows_per_task,
                                    const c10::optional<at::Tensor>& aux_ids, int64_t k_aux);

at::Tensor gather_dot(const at::Tensor& indices, const at::Tensor& table, const at::Tensor& vectors);
at::Tensor scatter_outer(const at::Tensor& indices, const at::Tensor& coeffs, const at::Tensor& rows,
                         int64_t n_latents);
at::Tensor project_out_radial(const at::Tensor& grad, const at::Tensor& weight);
