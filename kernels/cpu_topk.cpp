// Fused TopK selection for CPUs: (x @ W^T + b) tile by tile, each tile scanned into per-row
// min-heaps of the k best while it is still in cache. One parallel region per call, over
// row blocks; each block runs its own single-threaded GEMMs. The PyTorch path in
// kernels/reference.py (select_topk) has the same semantics and is what this is tested against.
//
// Why: the PyTorch path issues ~20 small ops per tile, several of which open a parallel
// region each; with another process on the same cores every barrier waits for a descheduled
// thread, and the encode ran at 2.2x its matmul floor. Here the only barrier is at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Restore the min-heap order (by score) after slot 0 was replaced.
inline void sift_down(float* score, float* pre, int64_t* idx, int64_t k) {
  int64_t i = 0;
  while (true) {
    const int64_t l = 2 * i + 1, r = l + 1;
    int64_t m = i;
    if (l < k && score[l] < score[m]) m = l;
    if (r < k && score[r] < score[m]) m = r;
    if (m == i) return;
    std::swap(score[i], score[m]);
    std::swap(pre[i], pre[m]);
    std::swap(idx[i], idx[m]);
    i = m;
  }
}

// A row with fewer than k allowed latents keeps -inf slots: give them distinct latents not
// already picked (as a top-k over the masked scores would), so no latent appears twice.
inline void pad_distinct(const float* score, int64_t* idx, int64_t k, int64_t n) {
  std::vector<int64_t> picked;
  for (int64_t j = 0; j < k; ++j)
    if (score[j] != -std::numeric_limits<float>::infinity()) picked.push_back(idx[j]);
  if (static_cast<int64_t>(picked.size()) == k) return;
  std::sort(picked.begin(), picked.end());
  int64_t next = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (score[j] != -std::numeric_limits<float>::infinity()) continue;
    while (std::binary_search(picked.begin(), picked.end(), next)) ++next;
    idx[j] = next++;
  }
}

}  // namespace

// Returns (pre-activations, latent indices, scores) of the k best latents per row, unsorted.
// Rows with fewer than k allowed latents keep score -inf (and pre 0, index 0) in the rest.
std::vector<at::Tensor> select_topk(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    int64_t k, bool use_abs, const c10::optional<at::Tensor>& abs_mask,
                                    int64_t chunk, int64_t rows_per_task) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
              bias.scalar_type() == at::kFloat, "select_topk: float32 tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && bias.is_contiguous(), "select_topk: contiguous only");
  const int64_t B = x.size(0), n = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= n && chunk >= 1 && rows_per_task >= 1, "select_topk: bad k / chunk / rows_per_task");
  const bool* allowed = abs_mask.has_value() ? abs_mask->data_ptr<bool>() : nullptr;
  auto pre_out = at::empty({B, k}, x.options());
  auto idx_out = at::empty({B, k}, x.options().dtype(at::kLong));
  auto score_out = at::empty({B, k}, x.options());
  const int64_t width = std::min(chunk, n), tasks = (B + rows_per_task - 1) / rows_per_task;
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    auto tile_buf = at::empty({std::min(rows_per_task, B) * width}, x.options());
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * rows_per_task, rows = std::min(rows_per_task, B - r0);
      float* hs = score_out.data_ptr<float>() + r0 * k;
      float* hp = pre_out.data_ptr<float>() + r0 * k;
      int64_t* hi = idx_out.data_ptr<int64_t>() + r0 * k;
      std::fill(hs, hs + rows * k, -std::numeric_limits<float>::infinity());
      std::fill(hp, hp + rows * k, 0.f);
      std::fill(hi, hi + rows * k, int64_t{0});
      const auto xb = x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t cw = std::min(chunk, n - c0);
        auto tile = tile_buf.narrow(0, 0, rows * cw).view({rows, cw});
        at::addmm_out(tile, bias.narrow(0, c0, cw), xb, weight.narrow(0, c0, cw).t());
        const float* P = tile.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r) {
          float* s = hs + r * k;
          float* p = hp + r * k;
          int64_t* id = hi + r * k;
          const float* row = P + r * cw;
          float kth = s[0];
          for (int64_t j = 0; j < cw; ++j) {
            const float v = row[j];
            const float sc = use_abs ? std::fabs(v) : v;
            if (sc > kth && (allowed == nullptr || allowed[c0 + j])) {
              s[0] = sc;
              p[0] = v;
              id[0] = c0 + j;
              sift_down(s, p, id, k);
              kth = s[0];
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) pad_distinct(hs + r * k, hi + r * k, k, n);
    }
  });
  return {pre_out, idx_out, score_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_topk", &select_topk, "fused CPU TopK selection (see kernels/cpu_topk.cpp)");
}
