// Fused TopK selection for CPUs: (x @ W^T + b) tile by tile, each tile scanned into per-row
// min-heaps of the k best while it is still in cache. One parallel region per call, over
// row blocks; each block runs its own single-threaded GEMMs. The PyTorch path in
// kernels/reference.py (select_topk) has the same semantics and is what this is tested against.
//
// Why: the PyTorch path issues ~20 small ops per tile, several of which open a parallel
// region each; with another process on the same cores every barrier waits for a descheduled
// thread, and the encode ran at 2.2x its matmul floor. Here the only barrier is at the end.
//
// AuxK's selection (the k_aux best among the dead latents) can ride on the same tiles: the
// dead latents' pre-activations of a row block are gathered while each tile is in cache and
// radix-selected once the block is done. A second pass would redo B*d*|dead| of matmul, and a
// heap would sift on most entries, since k_aux is a large share of the dead (256 of ~1.7k).
#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// An unsigned key in the order of the float score; NaN lowest (never preferred).
inline uint32_t ordered_key(float score) {
  if (std::isnan(score)) return 0;
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One round of radix_select over m candidates (position(q) for q < m) by their byte at
// `shift`: those above the byte of the `need`-th largest are chosen, those at it stay in doubt
// (written to doubt[0..), which may be where the positions are read from). Returns how many stay.
template <typename Position>
inline int64_t radix_round(const uint32_t* key, Position position, int64_t m, int shift, int64_t& need,
                           int32_t* doubt, int32_t* chosen, int64_t& n_chosen) {
  int64_t count[256] = {};
  for (int64_t q = 0; q < m; ++q) ++count[(key[position(q)] >> shift) & 255u];
  uint32_t byte = 255;
  while (count[byte] < need) need -= count[byte--];
  int64_t kept = 0;
  for (int64_t q = 0; q < m; ++q) {
    const int32_t p = position(q);
    const uint32_t b = (key[p] >> shift) & 255u;
    if (b > byte) chosen[n_chosen++] = p;
    else if (b == byte) doubt[kept++] = p;
  }
  return kept;
}

// Writes to `chosen` the positions of the k largest of key[0..n) (at a tie with the k-th, the
// first ones): a radix select, one byte at a time from the top. Two passes over all n, then
// short ones over the few in doubt, instead of nth_element's data-dependent branches.
inline void radix_select(const uint32_t* key, int64_t n, int64_t k, int32_t* doubt, int32_t* chosen) {
  int64_t need = k, n_chosen = 0;
  int64_t in_doubt = radix_round(key, [](int64_t q) { return static_cast<int32_t>(q); }, n, 24, need, doubt, chosen,
                                 n_chosen);
  for (int shift = 16; shift >= 0; shift -= 8)
    in_doubt = radix_round(key, [doubt](int64_t q) { return doubt[q]; }, in_doubt, shift, need, doubt, chosen,
                           n_chosen);
  for (int64_t q = 0; q < need; ++q) chosen[n_chosen++] = doubt[q];  // all equal to the k-th
}

}  // namespace

// Returns (pre-activations, latent indices, scores) of the k best latents per row, unsorted.
// Rows with fewer than k allowed latents keep score -inf (and pre 0, index 0) in the rest.
// With aux_ids (ascending latent ids) and k_aux >= 1, also (pre-activations, latent ids) of the
// k_aux best among those latents per row, unsorted; abs_mask does not restrict them.
std::vector<at::Tensor> select_topk(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    int64_t k, bool use_abs, const c10::optional<at::Tensor>& abs_mask,
                                    int64_t chunk, int64_t rows_per_task,
                                    const c10::optional<at::Tensor>& aux_ids, int64_t k_aux) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
              bias.scalar_type() == at::kFloat, "select_topk: float32 tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && bias.is_contiguous(), "select_topk: contiguous only");
  const int64_t B = x.size(0), n = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= n && chunk >= 1 && rows_per_task >= 1, "select_topk: bad k / chunk / rows_per_task");
  const bool* allowed = abs_mask.has_value() ? abs_mask->data_ptr<bool>() : nullptr;
  auto pre_out = at::empty({B, k}, x.options());
  auto idx_out = at::empty({B, k}, x.options().dtype(at::kLong));
  auto score_out = at::empty({B, k}, x.options());
  const int64_t n_aux = aux_ids.has_value() && k_aux > 0 ? aux_ids->numel() : 0;
  TORCH_CHECK(k_aux <= n_aux || k_aux == 0, "select_topk: k_aux exceeds the aux latents");
  TORCH_CHECK(n_aux == 0 || (aux_ids->scalar_type() == at::kLong && aux_ids->is_contiguous()),
              "select_topk: aux_ids must be contiguous int64");
  const int64_t* aux_id = n_aux ? aux_ids->data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(n_aux == 0 || (aux_id[0] >= 0 && aux_id[n_aux - 1] < n), "select_topk: aux_ids out of range");
  auto aux_pre_out = at::empty({B, n_aux ? k_aux : 0}, x.options());
  auto aux_idx_out = at::empty({B, n_aux ? k_aux : 0}, x.options().dtype(at::kLong));
  const int64_t width = std::min(chunk, n), tasks = (B + rows_per_task - 1) / rows_per_task;
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    auto tile_buf = at::empty({std::min(rows_per_task, B) * width}, x.options());
    std::vector<float> aux_buf(std::min(rows_per_task, B) * n_aux);
    std::vector<uint32_t> aux_keys(n_aux);
    std::vector<int32_t> aux_doubt(n_aux), aux_chosen(k_aux > 0 ? k_aux : 0);
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
        const int64_t aux_lo = n_aux ? std::lower_bound(aux_id, aux_id + n_aux, c0) - aux_id : 0;
        const int64_t aux_hi = n_aux ? std::lower_bound(aux_id, aux_id + n_aux, c0 + cw) - aux_id : 0;
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
          float* gathered = aux_buf.data() + r * n_aux;
          for (int64_t q = aux_lo; q < aux_hi; ++q) gathered[q] = row[aux_id[q] - c0];
        }
      }
      for (int64_t r = 0; r < rows; ++r) pad_distinct(hs + r * k, hi + r * k, k, n);
      for (int64_t r = 0; r < rows && n_aux; ++r) {
        const float* gathered = aux_buf.data() + r * n_aux;
        for (int64_t q = 0; q < n_aux; ++q) aux_keys[q] = ordered_key(use_abs ? std::fabs(gathered[q]) : gathered[q]);
        radix_select(aux_keys.data(), n_aux, k_aux, aux_doubt.data(), aux_chosen.data());
        float* ap = aux_pre_out.data_ptr<float>() + (r0 + r) * k_aux;
        int64_t* ai = aux_idx_out.data_ptr<int64_t>() + (r0 + r) * k_aux;
        for (int64_t j = 0; j < k_aux; ++j) {
          ap[j] = gathered[aux_chosen[j]];
          ai[j] = aux_id[aux_chosen[j]];
        }
      }
    }
  });
  return {pre_out, idx_out, score_out, aux_pre_out, aux_idx_out};
}
