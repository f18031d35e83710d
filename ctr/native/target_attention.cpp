// Masked target attention over a few dozen slots per sample, the CPU form of `MultiHeadTargetAttention.absorbed`
// (ctr/modules/esu.py: SIM's and R2LED's ESUs, and every two-stage model's short branch with `short_attention:
// mhta`): for sample b, head h and slot j with mask[b, j] true,
//   s_hj = <q_bh, k_bj> (+ bias_bjh),   p_h = softmax_j(s_h) over the real slots,   out_bh = sum_j p_hj v_bj,
// with the query already mapped into the key space and scaled (``W_k^hT W_q^h e_t / sqrt(d_h)``) and an optional
// per-slot, per-head bias (TWIN's cross features, ctr/modules/twin.py: its heads are the H queries here). A sample
// without real slots pools to zeros, and padded slots get probability 0 and no gradient, as the eager masked softmax.
//
// Eager PyTorch runs it as batched matrix products of one sample each ([K, Dk] by [Dk, H], [H, K] by [K, Dv]; four
// more in backward) with a masked_fill, a softmax and a product between: at SIM's 1,024 x 50 slots, two heads, the
// `bmm`s alone were about 20 ms of a 90 ms training step at FuxiCTR's architecture (the ESU and the short branch).
// Here a sample's slots are read once per head forward and once backward, in cache, and its gradients written once.
// The Python side (ctr/native/__init__.py) holds the autograd function and the fallback; tests/test_native.py holds
// the output and every gradient equal to the eager form's, empty samples and shared keys/values included.
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

constexpr int64_t kSamplesPerItem = 16;  // samples per parallel work item

inline void add_scaled(float a, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t e = 0; e < d; ++e) y[e] += a * x[e];
}

void check(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
           const c10::optional<at::Tensor>& bias) {
  for (const at::Tensor* t : {&q, &keys, &values}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->is_contiguous(),
                "ctr_native target_attention: q, keys and values must be contiguous float32 3-d CPU tensors");
  }
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.is_contiguous(),
              "ctr_native target_attention: mask must be a contiguous bool [B, K] CPU tensor");
  const int64_t b = q.size(0), k = keys.size(1);
  TORCH_CHECK(keys.size(0) == b && values.size(0) == b && values.size(1) == k && mask.size(0) == b &&
                  mask.size(1) == k && keys.size(2) == q.size(2),
              "ctr_native target_attention: expected q [B, H, Dk], keys [B, K, Dk], values [B, K, Dv], mask [B, K]; "
              "got q ", q.sizes(), ", keys ", keys.sizes(), ", values ", values.sizes(), ", mask ", mask.sizes());
  if (bias.has_value()) {
    const at::Tensor& t = *bias;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 3 &&
                    t.size(0) == b && t.size(1) == k && t.size(2) == q.size(1),
                "ctr_native target_attention: bias must be a contiguous float32 [B, K, H] CPU tensor, got ", t.sizes());
  }
}

// (out [B, H, Dv], probs [B, H, K]); the probabilities are saved for the backward
std::tuple<at::Tensor, at::Tensor> target_attention_forward(const at::Tensor& q, const at::Tensor& keys,
                                                            const at::Tensor& values, const at::Tensor& mask,
                                                            const c10::optional<at::Tensor>& bias) {
  check(q, keys, values, mask, bias);
  const int64_t b = q.size(0), h = q.size(1), dk = q.size(2), k = keys.size(1), dv = values.size(2);
  at::Tensor out = at::zeros({b, h, dv}, q.options());
  at::Tensor probs = at::zeros({b, h, k}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, b, kSamplesPerItem, [&](int64_t s0, int64_t s1) {
    std::vector<int64_t> real(k);
    for (int64_t s = s0; s < s1; ++s) {
      const bool* m = mp + s * k;
      int64_t n = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (m[j]) real[n++] = j;
      }
      if (n == 0) continue;  // no real slot: zeros, as the eager masked softmax
      const float* ks = kp + s * k * dk;
      const float* vs = vp + s * k * dv;
      for (int64_t head = 0; head < h; ++head) {
        const float* qh = qp + (s * h + head) * dk;
        float* p = pp + (s * h + head) * k;
        float top = -INFINITY;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t j = real[i];
          p[j] = dot(qh, ks + j * dk, dk) + (bp ? bp[(s * k + j) * h + head] : 0.0f);
          top = std::max(top, p[j]);
        }
        float total = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t j = real[i];
          p[j] = ctr_native::exp_f(p[j] - top);
          total += p[j];
        }
        const float inv = 1.0f / total;
        float* o = op + (s * h + head) * dv;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t j = real[i];
          p[j] *= inv;
          add_scaled(p[j], vs + j * dv, o, dv);
        }
      }
    }
  });
  return {out, probs};
}

// (grad_q [B, H, Dk], grad_keys [B, K, Dk], grad_values [B, K, Dv], grad_bias [B, K, H]); with `same` (keys and
// values are one tensor) grad_keys holds both gradients and grad_values is empty; grad_bias is empty without a bias
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> target_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& mask, const at::Tensor& probs, bool same, bool with_bias) {
  check(q, keys, values, mask, c10::nullopt);
  const int64_t b = q.size(0), h = q.size(1), dk = q.size(2), k = keys.size(1), dv = values.size(2);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 3 && grad.size(0) == b &&
                  grad.size(1) == h && grad.size(2) == dv,
              "ctr_native target_attention: grad must be a contiguous float32 [B, H, Dv] tensor");
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.numel() == b * h * k,
              "ctr_native target_attention: probs must be the forward's [B, H, K]");
  TORCH_CHECK(!same || dk == dv, "ctr_native target_attention: shared keys and values need one width");
  // written sample by sample in the loop below by the thread that owns the sample (not a serial fill of fresh
  // [B, K, D] blocks first)
  at::Tensor gq = at::empty_like(q);
  at::Tensor gk = at::empty_like(keys);
  at::Tensor gv = same ? at::empty({0}, values.options()) : at::empty_like(values);
  at::Tensor gb = with_bias ? at::empty({b, k, h}, q.options()) : at::empty({0}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const float* pp = probs.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* gqp = gq.data_ptr<float>();
  float* gkp = gk.data_ptr<float>();
  float* gvp = same ? gkp : gv.data_ptr<float>();
  float* gbp = with_bias ? gb.data_ptr<float>() : nullptr;
  at::parallel_for(0, b, kSamplesPerItem, [&](int64_t s0, int64_t s1) {
    std::vector<int64_t> real(k);
    std::vector<float> ds(h * k), centre(h), g(h);
    for (int64_t s = s0; s < s1; ++s) {
      const bool* m = mp + s * k;
      float* gks = gkp + s * k * dk;
      float* gvs = gvp + s * k * dv;
      float* gqs = gqp + s * h * dk;
      std::fill(gqs, gqs + h * dk, 0.0f);
      if (gbp) std::fill(gbp + s * k * h, gbp + (s + 1) * k * h, 0.0f);
      int64_t n = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (m[j]) {
          real[n++] = j;
        } else {  // a padded slot: no gradient (its rows are written nowhere else)
          std::fill(gks + j * dk, gks + (j + 1) * dk, 0.0f);
          if (!same) std::fill(gvs + j * dv, gvs + (j + 1) * dv, 0.0f);
        }
      }
      if (n == 0) continue;
      const float* ks = kp + s * k * dk;
      const float* vs = vp + s * k * dv;
      const float* ps = pp + s * h * k;
      const float* gos = gp + s * h * dv;
      const float* qs = qp + s * h * dk;
      // slot by slot, every head: each slot's rows are read once a pass and its gradient rows written once (not
      // zeroed, then added to by each head); per head the sums run in slot order as before
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = real[i];
        const float* vj = vs + j * dv;
        float* row = gvs + j * dv;  // d out / d v_j = sum_h p_hj go_h
        for (int64_t head = 0; head < h; ++head) {
          const float* go = gos + head * dv;
          ds[head * n + i] = dot(go, vj, dv);
          const float pj = ps[head * k + j];
          if (head == 0) {
            for (int64_t e = 0; e < dv; ++e) row[e] = pj * go[e];
          } else {
            add_scaled(pj, go, row, dv);
          }
        }
      }
      for (int64_t head = 0; head < h; ++head) {  // sum_j p_j <go, v_j>
        float c = 0.0f;
        for (int64_t i = 0; i < n; ++i) c += ps[head * k + real[i]] * ds[head * n + i];
        centre[head] = c;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = real[i];
        const float* kj = ks + j * dk;
        float* row = gks + j * dk;  // d loss / d k_j = sum_h g_hj q_h (+ the value gradient above, when shared)
        for (int64_t head = 0; head < h; ++head) {
          const float gj = ps[head * k + j] * (ds[head * n + i] - centre[head]);  // d loss / d s_hj
          if (gbp) gbp[(s * k + j) * h + head] = gj;
          add_scaled(gj, kj, gqs + head * dk, dk);
          g[head] = gj;
        }
        const float* q0 = qs;
        if (same) {
          add_scaled(g[0], q0, row, dk);
        } else {
          for (int64_t e = 0; e < dk; ++e) row[e] = g[0] * q0[e];
        }
        for (int64_t head = 1; head < h; ++head) add_scaled(g[head], qs + head * dk, row, dk);
      }
    }
  });
  return {gq, gk, gv, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def(
      "target_attention_forward(Tensor q, Tensor keys, Tensor values, Tensor mask, Tensor? bias) -> (Tensor, "
      "Tensor)");
  m.def(
      "target_attention_backward(Tensor grad, Tensor q, Tensor keys, Tensor values, Tensor mask, Tensor probs, "
      "bool same, bool with_bias) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("target_attention_forward", &target_attention_forward);
  m.impl("target_attention_backward", &target_attention_backward);
}
