// The soft search's relevance-weighted pooling over a jagged prefix (SIM-soft's auxiliary CTR head, Pi et al.
// 2020, Sec. 4.1): for sample b and each of its behaviors n in [offsets[b], offsets[b + 1]),
//   r_n = <k_n, q_b>,   pooled_b = sum_n r_n v_n.
//
// Eager PyTorch runs it as about ten passes over the [N, D] prefix (N: every behavior a batch searched, ~300K on the
// demo world): the query gathered to every row, a product, a sum, the weighted rows, an index_add, and in backward
// the same again plus the gathers' scatters. Here the forward reads the prefix once and the backward reads it once
// and writes its gradient once (r_n is recomputed there, not saved). The Python side (ctr/native/__init__.py) holds
// the autograd function and the fallback; tests/test_native.py holds the outputs and every gradient equal to the
// eager form, empty samples included.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t kChunksPerThread = 8;  // work items per thread: samples grouped into chunks of about equal behaviors

using ctr_native::dot;  // eight partial sums: vectorized (vec_math.h)

inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];
}

void check(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& q, const at::Tensor& offsets) {
  for (const at::Tensor* t : {&keys, &values, &q}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous(),
                "ctr_native dot_pool: keys, values and q must be contiguous float32 [rows, width] CPU tensors");
  }
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.is_contiguous() && offsets.size(0) == q.size(0) + 1,
              "ctr_native dot_pool: offsets must be a contiguous int64 [B + 1] CPU tensor, B = q's rows");
  TORCH_CHECK(keys.size(0) == values.size(0), "ctr_native dot_pool: keys ", keys.sizes(), " and values ",
              values.sizes(), " have different row counts");
  TORCH_CHECK(keys.size(1) == q.size(1), "ctr_native dot_pool: keys ", keys.sizes(), " and q ", q.sizes(),
              " have different widths");
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t b = q.size(0);
  TORCH_CHECK(o[0] == 0 && o[b] == keys.size(0), "ctr_native dot_pool: offsets must run from 0 to the rows (",
              keys.size(0), "), got ", o[0], " to ", o[b]);
}

// f(b0, b1) over the samples, in chunks of about equal behaviors (the prefixes' lengths follow a power law: equal
// sample counts per thread would leave one thread with the longest users)
template <typename F>
void for_samples(const int64_t* o, int64_t b, F&& f) {
  const int64_t n = o[b];
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(b, at::get_num_threads() * kChunksPerThread));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // chunk c takes the samples whose first behavior lies in [c n / chunks, (c + 1) n / chunks); the last chunk
      // also takes the trailing empty samples
      const int64_t lo = c * n / chunks, hi = (c + 1) * n / chunks;
      const int64_t s0 = c == 0 ? 0 : std::lower_bound(o, o + b, lo) - o;
      const int64_t s1 = c + 1 == chunks ? b : std::lower_bound(o, o + b, hi) - o;
      if (s0 < s1) f(s0, s1);
    }
  });
}

at::Tensor dot_pool_forward(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& q,
                            const at::Tensor& offsets) {
  check(keys, values, q, offsets);
  const int64_t b = q.size(0), dk = keys.size(1), dv = values.size(1);
  at::Tensor out = at::zeros({b, dv}, values.options());
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  float* out_p = out.data_ptr<float>();
  for_samples(o, b, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const float* qs = qp + s * dk;
      float* os = out_p + s * dv;
      for (int64_t i = o[s]; i < o[s + 1]; ++i) axpy(dot(k + i * dk, qs, dk), v + i * dv, os, dv);
    }
  });
  return out;
}

// (grad_keys, grad_values, grad_q); with `same` (keys and values are one tensor) grad_keys holds both gradients
// and grad_values is empty
std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_pool_backward(const at::Tensor& grad, const at::Tensor& keys,
                                                                 const at::Tensor& values, const at::Tensor& q,
                                                                 const at::Tensor& offsets, bool same) {
  check(keys, values, q, offsets);
  const int64_t b = q.size(0), dk = keys.size(1), dv = values.size(1);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  grad.dim() == 2 && grad.size(0) == b && grad.size(1) == dv,
              "ctr_native dot_pool: grad must be a contiguous float32 [B, values' width] CPU tensor");
  TORCH_CHECK(!same || dk == dv, "ctr_native dot_pool: same keys and values need one width");
  at::Tensor gk = at::empty_like(keys);
  at::Tensor gv = same ? at::empty({0}, values.options()) : at::empty_like(values);
  at::Tensor gq = at::zeros_like(q);
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  float* gk_p = gk.data_ptr<float>();
  float* gv_p = same ? nullptr : gv.data_ptr<float>();
  float* gq_p = gq.data_ptr<float>();
  for_samples(o, b, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const float* qs = qp + s * dk;
      const float* gs = g + s * dv;
      float* gqs = gq_p + s * dk;
      for (int64_t i = o[s]; i < o[s + 1]; ++i) {
        const float* ki = k + i * dk;
        const float r = dot(ki, qs, dk);              // the relevance, recomputed
        const float gr = dot(gs, v + i * dv, dv);     // d pooled / d r_i, projected on the gradient
        float* __restrict gki = gk_p + i * dk;
        if (same) {
          for (int64_t j = 0; j < dk; ++j) gki[j] = r * gs[j] + gr * qs[j];
        } else {
          float* __restrict gvi = gv_p + i * dv;
          for (int64_t j = 0; j < dv; ++j) gvi[j] = r * gs[j];
          for (int64_t j = 0; j < dk; ++j) gki[j] = gr * qs[j];
        }
        axpy(gr, ki, gqs, dk);
      }
    }
  });
  return {gk, gv, gq};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("dot_pool_forward(Tensor keys, Tensor values, Tensor q, Tensor offsets) -> Tensor");
  m.def(
      "dot_pool_backward(Tensor grad, Tensor keys, Tensor values, Tensor q, Tensor offsets, bool same) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("dot_pool_forward", &dot_pool_forward);
  m.impl("dot_pool_backward", &dot_pool_backward);
}
