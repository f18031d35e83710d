// DIEN's auxiliary loss's dot products (`ctr.modules.augru.next_dots`, `DIEN.auxiliary_loss` with `aux_net: dot`): for
// every sample b and step t < L − 1, the interest state against the next clicked and the next sampled behavior,
//   pos[b, t] = <h[b, t], clicked[b, t + 1]>,   neg[b, t] = <h[b, t], sampled[b, t + 1]>,
// and backward, from the gradients gp, gn of those [B, L − 1] logits,
//   dh[b, t] = gp[b, t] clicked[b, t + 1] + gn[b, t] sampled[b, t + 1]   (t < L − 1; zero at t = L − 1)
//   dclicked[b, t + 1] = gp[b, t] h[b, t],   dsampled[b, t + 1] = gn[b, t] h[b, t]   (zero at t = 0).
// Eager, that is three slices of [B, L, H] blocks (each slice's backward a zero-filled block and a copy), two products
// and two sums forward, four products and an addition backward: about a dozen passes over 6.5 MB blocks at B 1,024,
// L 50, H 32. Here forward reads the three blocks once and backward reads them once and writes their gradients once.
// Whole samples are the parallel work items, so the results do not depend on the thread count.
// tests/test_native.py holds it to the eager form.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace next_dots_impl {

void check(const at::Tensor& h, const at::Tensor& clicked, const at::Tensor& sampled) {
  for (const at::Tensor* t : {&h, &clicked, &sampled}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->is_contiguous(),
                "ctr_native next_dots: states, clicked and sampled must be contiguous float32 [B, L, H] CPU tensors");
  }
  TORCH_CHECK(clicked.sizes() == h.sizes() && sampled.sizes() == h.sizes(),
              "ctr_native next_dots: clicked ", clicked.sizes(), " and sampled ", sampled.sizes(),
              " must have the states' shape ", h.sizes());
}

std::vector<at::Tensor> next_dots_forward(const at::Tensor& h, const at::Tensor& clicked, const at::Tensor& sampled) {
  check(h, clicked, sampled);
  const int64_t b = h.size(0), l = h.size(1), d = h.size(2), pairs = l > 0 ? l - 1 : 0;
  at::Tensor pos = at::empty({b, pairs}, h.options()), neg = at::empty({b, pairs}, h.options());
  const float *hp = h.data_ptr<float>(), *cp = clicked.data_ptr<float>(), *sp = sampled.data_ptr<float>();
  float *pp = pos.data_ptr<float>(), *np = neg.data_ptr<float>();
  at::parallel_for(0, b, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      for (int64_t t = 0; t < pairs; ++t) {
        const float* ht = hp + (s * l + t) * d;
        pp[s * pairs + t] = ctr_native::dot(ht, cp + (s * l + t + 1) * d, d);
        np[s * pairs + t] = ctr_native::dot(ht, sp + (s * l + t + 1) * d, d);
      }
    }
  });
  return {pos, neg};
}

// one pair's gradients: o = p c + n s (each product rounded, then summed, as autograd adds its two terms: never a fused
// multiply-add), oc = p h, os = n h
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
inline void pair_grads(float p, float n, const float* __restrict h, const float* __restrict c,
                       const float* __restrict smp, float* __restrict o, float* __restrict oc, float* __restrict os,
                       int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const float x = p * c[j], y = n * smp[j];
    o[j] = x + y;
    oc[j] = p * h[j];
    os[j] = n * h[j];
  }
}

// [d states, d clicked, d sampled]
std::vector<at::Tensor> next_dots_backward(const at::Tensor& gpos, const at::Tensor& gneg, const at::Tensor& h,
                                           const at::Tensor& clicked, const at::Tensor& sampled) {
  check(h, clicked, sampled);
  const int64_t b = h.size(0), l = h.size(1), d = h.size(2), pairs = l > 0 ? l - 1 : 0;
  for (const at::Tensor* g : {&gpos, &gneg}) {
    TORCH_CHECK(g->device().is_cpu() && g->scalar_type() == at::kFloat && g->is_contiguous() && g->dim() == 2 &&
                    g->size(0) == b && g->size(1) == pairs,
                "ctr_native next_dots: the logits' gradients must be contiguous float32 [B, L - 1] CPU tensors");
  }
  at::Tensor dh = at::empty_like(h), dc = at::empty_like(clicked), ds = at::empty_like(sampled);
  const float *hp = h.data_ptr<float>(), *cp = clicked.data_ptr<float>(), *sp = sampled.data_ptr<float>();
  const float *gp = gpos.data_ptr<float>(), *gn = gneg.data_ptr<float>();
  float *dhp = dh.data_ptr<float>(), *dcp = dc.data_ptr<float>(), *dsp = ds.data_ptr<float>();
  at::parallel_for(0, b, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      if (l == 0) continue;
      std::memset(dhp + (s * l + l - 1) * d, 0, sizeof(float) * d);  // the last state has no next behavior
      std::memset(dcp + s * l * d, 0, sizeof(float) * d);            // nor the first behavior a state before it
      std::memset(dsp + s * l * d, 0, sizeof(float) * d);
      for (int64_t t = 0; t < pairs; ++t) {
        const int64_t at = (s * l + t) * d, next = at + d;
        pair_grads(gp[s * pairs + t], gn[s * pairs + t], hp + at, cp + next, sp + next, dhp + at, dcp + next,
                   dsp + next, d);
      }
    }
  });
  return {dh, dc, ds};
}

}  // namespace next_dots_impl

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("next_dots_forward(Tensor h, Tensor clicked, Tensor sampled) -> Tensor[]");
  m.def("next_dots_backward(Tensor gpos, Tensor gneg, Tensor h, Tensor clicked, Tensor sampled) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("next_dots_forward", &next_dots_impl::next_dots_forward);
  m.impl("next_dots_backward", &next_dots_impl::next_dots_backward);
}
