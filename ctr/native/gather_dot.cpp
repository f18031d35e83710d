// The GSU's scores on the CPU (kernels/reference/gsu_topk.py's `gsu_scores_cpu`): for every behavior i of sample b,
// <v_i, q_b> and, for cosine, |v_i|^2, where v_i is row ids[i] of a table or row i of per-behavior vectors.
//
// The PyTorch forms either gather a [total_L, D] copy of the vectors (one 10K-long history among 512 samples is
// 300K rows x 64 floats: 80 MB written and read again) and take one matrix-vector product per sample, or score every
// table row against every target ([N, B], most of it never read). Here each behavior's row is read once, in place,
// and its dot product (and squared norm) taken with the query of its sample: no copy, no wasted products. Sums in
// `vec_math.h`'s fixed order: results equal the PyTorch forms' within float rounding (tests/test_native.py).
//
// `segment_dots` is the same for several queries per sample and a row given as column blocks (TWIN's GSU: its H
// heads' queries in the key space against [e(item); e(cate)], the two halves as the look-up returned them): out[i, q]
// = sum_p <part_p[i], queries[b, q, block p]>. The PyTorch form concatenated the halves ([total_L, 2d], 300K rows in
// a demo batch) and took one [L_b, 2d] x [2d, H] product per sample, a shape (4 outputs) the matrix kernels run
// slowly; here each row's blocks are read once in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t kGatherGrain = 2048;  // behaviors per parallel chunk

std::tuple<at::Tensor, at::Tensor> gather_dot(const at::Tensor& vectors, const c10::optional<at::Tensor>& ids,
                                              const at::Tensor& query, const at::Tensor& offsets, bool with_norms) {
  TORCH_CHECK(vectors.device().is_cpu() && vectors.scalar_type() == at::kFloat && vectors.dim() == 2 &&
                  vectors.is_contiguous(),
              "ctr_native gather_dot: vectors must be a contiguous float32 [N, D] CPU tensor");
  TORCH_CHECK(query.scalar_type() == at::kFloat && query.dim() == 2 && query.is_contiguous() &&
                  query.size(1) == vectors.size(1),
              "ctr_native gather_dot: query must be a contiguous float32 [B, D] tensor of the vectors' width");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) == query.size(0) + 1,
              "ctr_native gather_dot: offsets must be a contiguous int64 [B + 1] tensor");
  const bool by_id = ids.has_value() && ids->defined();
  if (by_id) {
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 1 && ids->is_contiguous(),
                "ctr_native gather_dot: ids must be a contiguous int64 [total_L] tensor");
  }
  const int64_t b = query.size(0), d = vectors.size(1);
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t total = by_id ? ids->size(0) : vectors.size(0);
  TORCH_CHECK(o[0] == 0 && o[b] == total, "ctr_native gather_dot: offsets must run from 0 to the behaviors (", total,
              "), got ", o[0], " to ", o[b]);
  at::Tensor dot = at::empty({total}, vectors.options());
  at::Tensor norms = with_norms ? at::empty({total}, vectors.options()) : at::empty({0}, vectors.options());
  if (total == 0) return {dot, norms};
  const float* v = vectors.data_ptr<float>();
  const float* q = query.data_ptr<float>();
  const int64_t* id = by_id ? ids->data_ptr<int64_t>() : nullptr;
  const int64_t rows = vectors.size(0);
  float* dp = dot.data_ptr<float>();
  float* np = with_norms ? norms.data_ptr<float>() : nullptr;
  if (by_id) {  // every id checked before any row is read
    for (int64_t i = 0; i < total; ++i) {
      TORCH_CHECK(id[i] >= 0 && id[i] < rows, "ctr_native gather_dot: id ", id[i], " at behavior ", i,
                  " is outside the table's ", rows, " rows");
    }
  }
  at::parallel_for(0, total, kGatherGrain, [&](int64_t i0, int64_t i1) {
    // the sample of behavior i0, then walked forward with i
    int64_t s = std::upper_bound(o, o + b + 1, i0) - o - 1;
    for (int64_t i = i0; i < i1; ++i) {
      while (o[s + 1] <= i) ++s;
      const float* row = v + (by_id ? id[i] : i) * d;
      dp[i] = ctr_native::dot(row, q + s * d, d);
      if (np != nullptr) np[i] = ctr_native::dot(row, row, d);
    }
  });
  return {dot, norms};
}

at::Tensor segment_dots(at::TensorList parts, const at::Tensor& queries, const at::Tensor& offsets) {
  TORCH_CHECK(!parts.empty(), "ctr_native segment_dots: at least one column block");
  TORCH_CHECK(queries.device().is_cpu() && queries.scalar_type() == at::kFloat && queries.dim() == 3 &&
                  queries.is_contiguous(),
              "ctr_native segment_dots: queries must be a contiguous float32 [B, Q, D] CPU tensor");
  const int64_t b = queries.size(0), nq = queries.size(1), d = queries.size(2);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) == b + 1,
              "ctr_native segment_dots: offsets must be a contiguous int64 [B + 1] tensor");
  const int64_t total = parts[0].size(0);
  std::vector<const float*> ptr;
  std::vector<int64_t> width, stride, start;
  int64_t w = 0;
  for (const at::Tensor& t : parts) {
    // each row's values contiguous, rows any stride apart (the item and category halves of a looked-up pair)
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == total &&
                    (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= t.size(1),
                "ctr_native segment_dots: every block must be a float32 [N, D_p] CPU tensor of N rows, each row's "
                "values contiguous");
    ptr.push_back(t.data_ptr<float>());
    width.push_back(t.size(1));
    stride.push_back(t.stride(0));
    start.push_back(w);
    w += t.size(1);
  }
  TORCH_CHECK(w == d, "ctr_native segment_dots: the blocks' widths sum to ", w, ", the queries are ", d, " wide");
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[b] == total, "ctr_native segment_dots: offsets must run from 0 to the rows (", total,
              "), got ", o[0], " to ", o[b]);
  at::Tensor out = at::empty({total, nq}, queries.options());
  if (total == 0) return out;
  const float* q = queries.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n_parts = static_cast<int64_t>(ptr.size());
  at::parallel_for(0, total, kGatherGrain, [&](int64_t i0, int64_t i1) {
    int64_t s = std::upper_bound(o, o + b + 1, i0) - o - 1;
    for (int64_t i = i0; i < i1; ++i) {
      while (o[s + 1] <= i) ++s;
      for (int64_t j = 0; j < nq; ++j) {
        const float* qj = q + (s * nq + j) * d;
        float acc = 0.0f;
        for (int64_t p = 0; p < n_parts; ++p) acc += ctr_native::dot(ptr[p] + i * stride[p], qj + start[p], width[p]);
        op[i * nq + j] = acc;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("gather_dot(Tensor vectors, Tensor? ids, Tensor query, Tensor offsets, bool with_norms) -> (Tensor, Tensor)");
  m.def("segment_dots(Tensor[] parts, Tensor queries, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("gather_dot", &gather_dot);
  m.impl("segment_dots", &segment_dots);
}
