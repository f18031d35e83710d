// Multi-head softmax attention over a handful of tokens per row (DiffuMIN's denoiser, ctr/modules/diffusion.py: the
// C = 4 interests of a sample, every (sample, channel) copy a row): for row n, head h, query i and key j,
//   s_ij = scale <q_i^h, k_j^h>,   p_i = softmax_j(s_i),   out_i^h = sum_j p_ij v_j^h.
//
// PyTorch's scaled_dot_product_attention runs each (row, head) as its own tiny problem, with a flash-attention
// kernel's blocking and bookkeeping around a 4 x 4 product; at 2,048 rows x 2 heads its forward and backward took
// about 10 ms per call on one core (20 calls a training step). Here a row is a few hundred multiply-adds in registers:
// the forward reads q, k, v once and writes the output and the probabilities (saved for the backward, N x H x Cq x C
// floats), the backward reads them once and writes the three gradients once.
//
// Layouts, as the projections produce them (no permuted copies): q [N, Cq, H * dh] and kv [N, C, 2 * H * dh] (the
// keys' heads, then the values'). The Python side (ctr/native/__init__.py) holds the autograd function and the
// fallback; tests/test_native.py holds the outputs and every gradient equal to scaled_dot_product_attention's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using ctr_native::dot;

constexpr int64_t kGrain = 64;  // rows per parallel work item


void check(const at::Tensor& q, const at::Tensor& kv, int64_t heads) {
  for (const at::Tensor* t : {&q, &kv}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->is_contiguous(),
                "ctr_native token_attention: q and kv must be contiguous float32 [rows, tokens, width] CPU tensors");
  }
  TORCH_CHECK(q.size(0) == kv.size(0), "ctr_native token_attention: q ", q.sizes(), " and kv ", kv.sizes(),
              " have different row counts");
  TORCH_CHECK(heads >= 1 && q.size(2) % heads == 0 && kv.size(2) == 2 * q.size(2),
              "ctr_native token_attention: q's width must be heads x head width and kv's twice it, got q ", q.sizes(),
              ", kv ", kv.sizes(), ", heads ", heads);
  TORCH_CHECK(kv.size(1) >= 1, "ctr_native token_attention: at least one key per row");
}

std::tuple<at::Tensor, at::Tensor> token_attention_forward(const at::Tensor& q, const at::Tensor& kv, int64_t heads,
                                                           double scale) {
  check(q, kv, heads);
  const int64_t n = q.size(0), cq = q.size(1), c = kv.size(1), d = q.size(2), dh = d / heads;
  at::Tensor out = at::empty_like(q);
  at::Tensor probs = at::empty({n, heads, cq, c}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, n, kGrain, [&](int64_t r0, int64_t r1) {
    std::vector<float> s(c);
    for (int64_t r = r0; r < r1; ++r) {
      const float* kr = kvp + r * c * 2 * d;  // key j, head h: kr + j * 2d + h * dh; its value: + d
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < cq; ++i) {
          const float* qi = qp + (r * cq + i) * d + h * dh;
          float m = -INFINITY;
          for (int64_t j = 0; j < c; ++j) {
            s[j] = dot(qi, kr + j * 2 * d + h * dh, dh) * sc;
            m = std::max(m, s[j]);
          }
          float total = 0.0f;
          for (int64_t j = 0; j < c; ++j) {
            s[j] = ctr_native::exp_f(s[j] - m);  // about 1 ulp, inline (libm's exp is a call per element)
            total += s[j];
          }
          const float inv = 1.0f / total;
          float* p = pp + ((r * heads + h) * cq + i) * c;
          float* __restrict o = op + (r * cq + i) * d + h * dh;
          for (int64_t e = 0; e < dh; ++e) o[e] = 0.0f;
          for (int64_t j = 0; j < c; ++j) {
            p[j] = s[j] * inv;
            const float* vj = kr + j * 2 * d + d + h * dh;
            for (int64_t e = 0; e < dh; ++e) o[e] += p[j] * vj[e];
          }
        }
      }
    }
  });
  return {out, probs};
}

// (grad_q [N, Cq, D], grad_kv [N, C, 2D])
std::tuple<at::Tensor, at::Tensor> token_attention_backward(const at::Tensor& grad, const at::Tensor& q,
                                                            const at::Tensor& kv, const at::Tensor& probs,
                                                            int64_t heads, double scale) {
  check(q, kv, heads);
  const int64_t n = q.size(0), cq = q.size(1), c = kv.size(1), d = q.size(2), dh = d / heads;
  TORCH_CHECK(grad.sizes() == q.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "ctr_native token_attention: grad must be a contiguous float32 tensor shaped like q");
  TORCH_CHECK(probs.is_contiguous() && probs.scalar_type() == at::kFloat && probs.numel() == n * heads * cq * c,
              "ctr_native token_attention: probs must be the forward's [rows, heads, queries, keys]");
  at::Tensor gq = at::empty_like(q);
  at::Tensor gkv = at::zeros_like(kv);
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  const float* pp = probs.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* gqp = gq.data_ptr<float>();
  float* gkvp = gkv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, n, kGrain, [&](int64_t r0, int64_t r1) {
    std::vector<float> ds(c);
    for (int64_t r = r0; r < r1; ++r) {
      const float* kr = kvp + r * c * 2 * d;
      float* gkr = gkvp + r * c * 2 * d;
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < cq; ++i) {
          const float* p = pp + ((r * heads + h) * cq + i) * c;
          const float* go = gp + (r * cq + i) * d + h * dh;
          const float* qi = qp + (r * cq + i) * d + h * dh;
          float dot_pdp = 0.0f;  // sum_j p_ij dp_ij
          for (int64_t j = 0; j < c; ++j) {
            const float* vj = kr + j * 2 * d + d + h * dh;
            float* __restrict gvj = gkr + j * 2 * d + d + h * dh;
            const float dp = dot(go, vj, dh);
            for (int64_t e = 0; e < dh; ++e) gvj[e] += p[j] * go[e];
            ds[j] = dp;
            dot_pdp += p[j] * dp;
          }
          float* __restrict gqi = gqp + (r * cq + i) * d + h * dh;
          for (int64_t e = 0; e < dh; ++e) gqi[e] = 0.0f;
          for (int64_t j = 0; j < c; ++j) {
            const float g = p[j] * (ds[j] - dot_pdp) * sc;  // d loss / d (q_i . k_j)
            const float* kj = kr + j * 2 * d + h * dh;
            float* __restrict gkj = gkr + j * 2 * d + h * dh;
            for (int64_t e = 0; e < dh; ++e) {
              gqi[e] += g * kj[e];
              gkj[e] += g * qi[e];
            }
          }
        }
      }
    }
  });
  return {gq, gkv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("token_attention_forward(Tensor q, Tensor kv, int heads, float scale) -> (Tensor, Tensor)");
  m.def(
      "token_attention_backward(Tensor grad, Tensor q, Tensor kv, Tensor probs, int heads, float scale) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("token_attention_forward", &token_attention_forward);
  m.impl("token_attention_backward", &token_attention_backward);
}
