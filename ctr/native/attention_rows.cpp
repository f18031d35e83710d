// Target attention over the rows of a jagged block, the ESU of TWIN and ETA when their GSU keeps every behavior
// (`TwoStageModel.fits_k`): the kept behaviors are the prefix itself, in order, so the op reads the looked-up rows
// where they lie instead of a zero-padded [B, K, D] copy of them (`to_slots`) and its concatenation with the cross
// features. For sample b (rows r of offsets[b] .. offsets[b + 1]) and head h:
//   s_hr = <q_bh, [a_r; x_r if scored]> (+ bias_rh),   p_h = softmax_r(s_h),   out_bh = sum_r p_hr [a_r; x_r]
// with the query already mapped into the key space and scaled (`MultiHeadTargetAttention.absorbed`, TWIN's
// `query_keys`). Two column blocks: `a` (the behaviors' embeddings, always scored) and `x` (TWIN's cross features,
// values only; SIM's and ETA's time embedding, scored too); `x` may be empty. A sample without rows pools to zeros.
//
// The backward walks a sample's rows slot by slot with every head, so each row's gradient is written once (the sum
// over heads), not zero-filled and then added to head by head. Samples are the parallel work items and every row
// belongs to one sample: the result does not depend on the thread count. ctr/native/attention_rows.py holds the
// autograd function and tests/test_attention_rows_native.py the outputs and every gradient equal to the eager form.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace attention_rows_impl {

using ctr_native::dot;

constexpr int64_t kSamplesPerItem = 16;  // samples per parallel work item

inline void add_scaled(float a, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t e = 0; e < d; ++e) y[e] += a * x[e];
}

inline void set_scaled(float a, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t e = 0; e < d; ++e) y[e] = a * x[e];
}

struct Shapes {
  int64_t b, h, qw, n, da, dx;
};

Shapes check(const at::Tensor& q, const at::Tensor& a, const at::Tensor& x, const at::Tensor& offsets,
             const c10::optional<at::Tensor>& bias, bool scored) {
  for (const at::Tensor* t : {&q, &a, &x}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "ctr_native attention_rows: q, a and x must be contiguous float32 CPU tensors");
  }
  TORCH_CHECK(q.dim() == 3 && a.dim() == 2 && x.dim() == 2 && x.size(0) == a.size(0),
              "ctr_native attention_rows: expected q [B, H, Dq], a [N, Da], x [N, Dx]; got q ", q.sizes(), ", a ",
              a.sizes(), ", x ", x.sizes());
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.is_contiguous() && offsets.numel() == q.size(0) + 1,
              "ctr_native attention_rows: offsets must be a contiguous int64 [B + 1] CPU tensor");
  const Shapes s{q.size(0), q.size(1), q.size(2), a.size(0), a.size(1), x.size(1)};
  TORCH_CHECK(s.qw == s.da + (scored ? s.dx : 0), "ctr_native attention_rows: the query is ", s.qw,
              " wide; the scored columns are ", s.da + (scored ? s.dx : 0));
  if (bias.has_value()) {
    const at::Tensor& t = *bias;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                    t.size(0) == s.n && t.size(1) == s.h,
                "ctr_native attention_rows: bias must be a contiguous float32 [N, H] CPU tensor, got ", t.sizes());
  }
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(s.b == 0 || (o[0] == 0 && o[s.b] == s.n), "ctr_native attention_rows: offsets must run from 0 to N = ",
              s.n);
  for (int64_t i = 0; i < s.b; ++i) {
    TORCH_CHECK(o[i] <= o[i + 1], "ctr_native attention_rows: offsets must be nondecreasing");
  }
  return s;
}

// (out [B, H, Da + Dx], probs [N, H]); the probabilities are saved for the backward
std::tuple<at::Tensor, at::Tensor> attention_rows_forward(const at::Tensor& q, const at::Tensor& a, const at::Tensor& x,
                                                          const at::Tensor& offsets,
                                                          const c10::optional<at::Tensor>& bias, bool scored) {
  const Shapes sh = check(q, a, x, offsets, bias, scored);
  const int64_t h = sh.h, qw = sh.qw, da = sh.da, dx = sh.dx, dv = da + dx;
  at::Tensor out = at::empty({sh.b, h, dv}, q.options());
  at::Tensor probs = at::empty({sh.n, h}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  at::parallel_for(0, sh.b, kSamplesPerItem, [&](int64_t s0, int64_t s1) {
    std::vector<float> top(h), total(h);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = op[s], r1 = op[s + 1];
      float* o = outp + s * h * dv;
      std::fill(o, o + h * dv, 0.0f);
      if (r1 == r0) continue;  // no rows: zeros, as the eager masked softmax
      const float* qs = qp + s * h * qw;
      std::fill(top.begin(), top.end(), -INFINITY);
      for (int64_t r = r0; r < r1; ++r) {
        const float* ar = ap + r * da;
        const float* xr = xp + r * dx;
        for (int64_t head = 0; head < h; ++head) {
          const float* qh = qs + head * qw;
          float v = dot(qh, ar, da) + (scored ? dot(qh + da, xr, dx) : 0.0f) + (bp ? bp[r * h + head] : 0.0f);
          pp[r * h + head] = v;
          top[head] = std::max(top[head], v);
        }
      }
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t head = 0; head < h; ++head) {
          const float e = ctr_native::exp_f(pp[r * h + head] - top[head]);
          pp[r * h + head] = e;
          total[head] += e;
        }
      }
      for (int64_t head = 0; head < h; ++head) total[head] = 1.0f / total[head];
      for (int64_t r = r0; r < r1; ++r) {
        const float* ar = ap + r * da;
        const float* xr = xp + r * dx;
        for (int64_t head = 0; head < h; ++head) {
          const float p = pp[r * h + head] * total[head];
          pp[r * h + head] = p;
          add_scaled(p, ar, o + head * dv, da);
          add_scaled(p, xr, o + head * dv + da, dx);
        }
      }
    }
  });
  return {out, probs};
}

// (grad_q [B, H, Dq], grad_a [N, Da], grad_x [N, Dx], grad_bias [N, H] or empty without a bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_rows_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& a, const at::Tensor& x, const at::Tensor& offsets,
    const at::Tensor& probs, bool scored, bool with_bias) {
  const Shapes sh = check(q, a, x, offsets, c10::nullopt, scored);
  const int64_t h = sh.h, qw = sh.qw, da = sh.da, dx = sh.dx, dv = da + dx;
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 3 && grad.size(0) == sh.b &&
                  grad.size(1) == h && grad.size(2) == dv,
              "ctr_native attention_rows: grad must be a contiguous float32 [B, H, Da + Dx] tensor");
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.numel() == sh.n * h,
              "ctr_native attention_rows: probs must be the forward's [N, H]");
  at::Tensor gq = at::empty_like(q);
  at::Tensor ga = at::empty_like(a);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gb = with_bias ? at::empty({sh.n, h}, q.options()) : at::empty({0}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const float* pp = probs.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* gqp = gq.data_ptr<float>();
  float* gap = ga.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  float* gbp = with_bias ? gb.data_ptr<float>() : nullptr;
  at::parallel_for(0, sh.b, kSamplesPerItem, [&](int64_t s0, int64_t s1) {
    std::vector<float> ds, centre(h), g(h);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = op[s], r1 = op[s + 1], n = r1 - r0;
      float* gqs = gqp + s * h * qw;
      std::fill(gqs, gqs + h * qw, 0.0f);
      if (n == 0) continue;
      ds.resize(static_cast<size_t>(n * h));
      const float* qs = qp + s * h * qw;
      const float* gos = gp + s * h * dv;
      // d out / d [a_r; x_r] = sum_h p_hr go_h, and ds_hr = <go_h, [a_r; x_r]>
      for (int64_t r = r0; r < r1; ++r) {
        const float* ar = ap + r * da;
        const float* xr = xp + r * dx;
        float* gar = gap + r * da;
        float* gxr = gxp + r * dx;
        for (int64_t head = 0; head < h; ++head) {
          const float* go = gos + head * dv;
          const float p = pp[r * h + head];
          ds[(r - r0) * h + head] = dot(go, ar, da) + dot(go + da, xr, dx);
          if (head == 0) {
            set_scaled(p, go, gar, da);
            set_scaled(p, go + da, gxr, dx);
          } else {
            add_scaled(p, go, gar, da);
            add_scaled(p, go + da, gxr, dx);
          }
        }
      }
      std::fill(centre.begin(), centre.end(), 0.0f);  // sum_r p_hr ds_hr
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t head = 0; head < h; ++head) centre[head] += pp[r * h + head] * ds[(r - r0) * h + head];
      }
      for (int64_t r = r0; r < r1; ++r) {
        const float* ar = ap + r * da;
        const float* xr = xp + r * dx;
        for (int64_t head = 0; head < h; ++head) {
          g[head] = pp[r * h + head] * (ds[(r - r0) * h + head] - centre[head]);  // d loss / d s_hr
          if (gbp) gbp[r * h + head] = g[head];
          add_scaled(g[head], ar, gqs + head * qw, da);
          if (scored) add_scaled(g[head], xr, gqs + head * qw + da, dx);
        }
        float* gar = gap + r * da;
        float* gxr = gxp + r * dx;
        for (int64_t head = 0; head < h; ++head) {
          add_scaled(g[head], qs + head * qw, gar, da);
          if (scored) add_scaled(g[head], qs + head * qw + da, gxr, dx);
        }
      }
    }
  });
  return {gq, ga, gx, gb};
}

}  // namespace attention_rows_impl

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def(
      "attention_rows_forward(Tensor q, Tensor a, Tensor x, Tensor offsets, Tensor? bias, bool scored) -> (Tensor, "
      "Tensor)");
  m.def(
      "attention_rows_backward(Tensor grad, Tensor q, Tensor a, Tensor x, Tensor offsets, Tensor probs, bool scored, "
      "bool with_bias) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("attention_rows_forward", &attention_rows_impl::attention_rows_forward);
  m.impl("attention_rows_backward", &attention_rows_impl::attention_rows_backward);
}
