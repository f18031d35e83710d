// Weighted sum pooling of rows per sample, DIN's ``pooled_b = Σ_i w_i v_i`` on behaviors given as rows
// (`DinAttention.forward_rows`: the short branch of the two-stage models and DIN's history): for row i of sample
// rows[i], read at position flat[i] of `values`,
//   out[b] = Σ_{i: rows[i] = b} w_i values[flat_i],
// and backward gw_i = <g_{rows[i]}, values[flat_i]>, gvalues[flat_i] = w_i g_{rows[i]} (zero on the rows not read).
//
// Eager, that is a product of the weights with the gathered rows ([N, Dv] written), a sum by index, and in backward
// a gather of the output's gradient to every row, two products and a row sum: five passes over [N, Dv] blocks
// (N: every behavior of a batch, 35K to 43K at batch 1,024 and L = 50). Here the forward reads each row once and the
// backward reads it once and writes its gradient once. `flat` must be strictly increasing and `rows` nondecreasing
// (whole samples are the parallel work items: each output row is summed in row order, so the result does not
// depend on the thread count). tests/test_attention_rows.py holds it to the eager form.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

void check(const at::Tensor& w, const at::Tensor& values, const at::Tensor& flat, const at::Tensor& rows, int64_t b) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 && w.is_contiguous(),
              "ctr_native weighted_pool: weights must be a contiguous float32 [N] CPU tensor");
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 2 &&
                  values.is_contiguous(),
              "ctr_native weighted_pool: values must be a contiguous float32 [M, D] CPU tensor");
  for (const at::Tensor* t : {&flat, &rows}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() &&
                    t->size(0) == w.size(0),
                "ctr_native weighted_pool: flat and rows must be contiguous int64 [N] CPU tensors, N = weights'");
  }
  const int64_t n = w.size(0), m = values.size(0);
  const int64_t *fp = flat.data_ptr<int64_t>(), *rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(fp[i] >= 0 && fp[i] < m && rp[i] >= 0 && rp[i] < b, "ctr_native weighted_pool: row ", i, " (flat ",
                fp[i], ", sample ", rp[i], ") is outside the ", m, " values or ", b, " samples");
    TORCH_CHECK(i == 0 || (fp[i] > fp[i - 1] && rp[i] >= rp[i - 1]),
                "ctr_native weighted_pool: flat must increase and rows must not decrease (row ", i, ")");
  }
}

// starts[s] = the first row of sample s (starts[b] = n)
std::vector<int64_t> sample_starts(const int64_t* rows, int64_t n, int64_t b) {
  std::vector<int64_t> starts(static_cast<size_t>(b + 1));
  for (int64_t s = 0; s <= b; ++s) starts[s] = std::lower_bound(rows, rows + n, s) - rows;
  return starts;
}

at::Tensor weighted_pool_forward(const at::Tensor& w, const at::Tensor& values, const at::Tensor& flat,
                                 const at::Tensor& rows, int64_t b) {
  check(w, values, flat, rows, b);
  const int64_t n = w.size(0), d = values.size(1);
  at::Tensor out = at::zeros({b, d}, values.options());
  const std::vector<int64_t> starts = sample_starts(rows.data_ptr<int64_t>(), n, b);
  const float *wp = w.data_ptr<float>(), *vp = values.data_ptr<float>();
  const int64_t* fp = flat.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, b, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      float* __restrict o = op + s * d;
      for (int64_t i = starts[s]; i < starts[s + 1]; ++i) {
        ctr_native::axpy(o, wp[i], vp + fp[i] * d, d);
      }
    }
  });
  return out;
}

// [grad weights [N] (empty unless need_weights), grad values [M, D] (empty unless need_values)]: SDIM's weights are
// its hash functions' shares, which have no gradient, and skipping their dots skips a read of every value row
std::vector<at::Tensor> weighted_pool_backward(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& values,
                                               const at::Tensor& flat, const at::Tensor& rows, bool need_values,
                                               bool need_weights) {
  const int64_t b = grad.size(0);
  check(w, values, flat, rows, b);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.dim() == 2 && grad.is_contiguous() &&
                  grad.size(1) == values.size(1),
              "ctr_native weighted_pool: grad must be a contiguous float32 [B, D] CPU tensor");
  const int64_t n = w.size(0), m = values.size(0), d = values.size(1);
  const std::vector<int64_t> starts = sample_starts(rows.data_ptr<int64_t>(), n, b);
  at::Tensor gw = at::empty({need_weights ? n : 0}, w.options());
  at::Tensor gv = at::empty({need_values ? m : 0, d}, values.options());
  const float *gp = grad.data_ptr<float>(), *wp = w.data_ptr<float>(), *vp = values.data_ptr<float>();
  const int64_t* fp = flat.data_ptr<int64_t>();
  float* gwp = need_weights ? gw.data_ptr<float>() : nullptr;
  float* gvp = need_values ? gv.data_ptr<float>() : nullptr;
  at::parallel_for(0, b, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const float* __restrict g = gp + s * d;
      for (int64_t i = starts[s]; i < starts[s + 1]; ++i) {
        if (gwp != nullptr) gwp[i] = ctr_native::dot(g, vp + fp[i] * d, d);
        if (gvp == nullptr) continue;
        // the rows between the previous row read and this one are not read: zero (each by the thread of row i)
        const int64_t gap = i == 0 ? 0 : fp[i - 1] + 1;
        if (fp[i] > gap) std::fill(gvp + gap * d, gvp + fp[i] * d, 0.0f);
        float* __restrict o = gvp + fp[i] * d;
        const float a = wp[i];
        for (int64_t j = 0; j < d; ++j) o[j] = a * g[j];
      }
    }
  });
  if (gvp != nullptr) {  // before the first row read (no rows at all: every row) and after the last
    const int64_t first = n > 0 ? fp[0] : m, last = n > 0 ? fp[n - 1] + 1 : m;
    std::fill(gvp, gvp + first * d, 0.0f);
    std::fill(gvp + last * d, gvp + m * d, 0.0f);
  }
  return {gw, gv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("weighted_pool_forward(Tensor w, Tensor values, Tensor flat, Tensor rows, int b) -> Tensor");
  m.def(
      "weighted_pool_backward(Tensor grad, Tensor w, Tensor values, Tensor flat, Tensor rows, bool need_values, "
      "bool need_weights) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("weighted_pool_forward", &weighted_pool_forward);
  m.impl("weighted_pool_backward", &weighted_pool_backward);
}
