// DIN's activation unit with Dice, forward and backward, in passes over blocks of rows that stay in cache
// (ctr/modules/attention.py, `DinAttention.scores`): for every real behavior i of sample r_i,
//   x_0 = qpart[r_i] + W_kp [k_i; q_{r_i} ⊙ k_i],   y_l = Dice_l(x_l),   x_l = W_l y_{l-1} + b_l,   s_i = w_out · y_L + b_out
// where k_i = keys[flat_i], Dice_l(x) = x (α + (1 − α) σ((x − mean) · invstd)) with the batch's column statistics in
// training (the running ones in evaluation), and qpart = (W_q + W_d) q + b_1 is the first layer's per-sample share.
//
// Eager, the unit is a chain of whole-batch operators, each a pass through memory over [N, 64..128] blocks (N: every
// real behavior of a batch, 43K at batch 1,024 and L = 50); on 2 cores the passes run at the memory's rate. Here
// each pass reads a group of rows once and keeps what it derives from them (Dice's outputs, the gradients flowing
// back) in per-thread buffers; what must reach memory is what the batch statistics need between passes: the layers'
// pre-activations forward, one gradient block per hidden layer backward. Training keeps each Dice's σ from forward
// (`keep`), so that backward computes no sigmoid (an exp and a division each: it computed 160 per row of the
// [80, 40] unit again, beside forward's 120); reading σ back costs less than recomputing it (backward 13.0 -> 11.0
// ms at 43K rows on 2 threads), for [N, H] more floats per hidden layer held until backward (as much again as the
// pre-activations: 480 MB for the [80, 40] unit at `data.max_batch_behaviors`' default of 1M). The first layer runs
// sample by sample as x_0 = qpart + M_bᵀ k (unit_first_layer.h: half the multiply-adds of a product on [k; q ⊙ k]); the
// others as BLAS on 256-row blocks, but a hidden layer's input gradient (inner dimension 40) through the same tile.
//
// Groups of whole samples (32 about equal ones, `sample_groups`) are the parallel work items: each writes its
// samples' gradients of qpart and the queries alone, and the column sums and weight gradients are added group by
// group in order, so the result does not depend on the thread count. `flat` must be strictly increasing and `rows`
// nondecreasing (the real positions of a row-major [B, L] mask, as `DinAttention.scores` builds them).
// With `pool` (`DinAttention.forward_rows` without softmax, pooling the keys themselves), the scores' pass also sums
// Σ_i s_i k_i per sample, and backward takes that sum's gradient where the unit already reads and writes the rows:
// <g_b, k_i> joins the scores' gradient in the last layer's pass, s_i g_b the keys' where the first layer writes them
// (rounded as autograd's separate term was): no pooling op, and no second [M, D] gradient of the keys to add.
// tests/test_din_unit.py holds the scores, every gradient and the running statistics to the eager module's, and the
// pooled form to the unit then `weighted_pool` bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dice_rows.h"
#include "unit_first_layer.h"
#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

// MKL's (or any BLAS's) Fortran sgemm, which libtorch_cpu exports where torch is built with it; weak, so that a
// build without it loads and multiplies through ATen instead
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace din_unit_impl {

using ctr_native::dice_from_p_row;
using ctr_native::dice_p_row;
using ctr_native::dice_row;
using ctr_native::dice_sums_a_row;
using ctr_native::dx_from_a_row;
using ctr_native::last_sums_row;
using ctr_native::sums_row;

constexpr int64_t kGroups = 32;        // parallel work items per pass (whole samples), about equal in rows
constexpr int64_t kMinGroupRows = 256;  // fewer items where there are fewer rows
constexpr int64_t kBlockRows = 256;   // rows per block inside a group, whose buffers stay in cache

// row-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, with row strides lda, ldb, ldc
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {  // column-major BLAS on the transposes: C^T = op(B)^T op(A)^T
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &im, &in, &ik, &alpha, b, &ia, a, &ib, &beta, c, &ic);
    return;
  }
  auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor am = at::from_blob(const_cast<float*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, opt);
  at::Tensor bm = at::from_blob(const_cast<float*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, opt);
  at::Tensor cm = at::from_blob(c, {m, n}, {ldc, 1}, opt);
  if (beta == 0.0f) cm.zero_();
  cm.addmm_(ta ? am.t() : am, tb ? bm.t() : bm, beta == 0.0f ? 1.0f : beta, alpha);
}

// group boundaries: the first sample change at or after each of kGroups equal shares of the rows. The groups depend on
// the rows alone, not on the thread count (their partial sums are added in group order), and are about equal, so that
// the threads' contiguous runs of groups are too: groups of at least 2,048 rows, the last one the remainder, left a
// thread ~6% more rows than the other on 2 threads at batch 1,024 and L = 50 (11 groups against 9 and a short one)
std::vector<int64_t> sample_groups(const int64_t* rows, int64_t n) {
  const int64_t groups = std::clamp<int64_t>(n / kMinGroupRows, 1, kGroups);
  std::vector<int64_t> bounds{0};
  for (int64_t g = 1; g < groups; ++g) {
    int64_t i = std::max(g * n / groups, bounds.back() + 1);
    while (i < n && rows[i] == rows[i - 1]) ++i;
    if (i >= n) break;
    bounds.push_back(i);
  }
  if (n > 0) bounds.push_back(n);
  return bounds;
}

void check_float(const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(),
              "ctr_native din_unit: ", what, " must be a contiguous float32 CPU tensor of ", dim, " dims, got ",
              t.sizes(), " ", t.scalar_type());
}

struct Shapes {
  int64_t n, d, b, m;
  std::vector<int64_t> h;  // hidden widths
};

// the inputs' checks, shared by forward and backward
Shapes check_inputs(const at::Tensor& keys, const at::Tensor& flat, const at::Tensor& query, const at::Tensor& rows,
                    const at::Tensor& w1, at::TensorList ws, at::TensorList alphas, const at::Tensor& w_out) {
  check_float(keys, 2, "keys");
  check_float(query, 2, "query");
  check_float(w1, 2, "w1");
  check_float(w_out, 1, "w_out");
  for (const auto* t : {&flat, &rows}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "ctr_native din_unit: flat and rows must be contiguous int64 [N] CPU tensors");
  }
  Shapes s{flat.size(0), keys.size(1), query.size(0), keys.size(0), {}};
  TORCH_CHECK(rows.size(0) == s.n, "ctr_native din_unit: flat has ", s.n, " rows, rows ", rows.size(0));
  TORCH_CHECK(query.size(1) == s.d, "ctr_native din_unit: query width ", query.size(1), " != keys width ", s.d);
  TORCH_CHECK(w1.size(1) == 2 * s.d, "ctr_native din_unit: w1 must be [H, 2D], got ", w1.sizes());
  TORCH_CHECK(alphas.size() == ws.size() + 1, "ctr_native din_unit: one alpha per hidden layer");
  s.h.push_back(w1.size(0));
  for (const auto& w : ws) {
    check_float(w, 2, "a hidden weight");
    TORCH_CHECK(w.size(1) == s.h.back(), "ctr_native din_unit: hidden weight ", w.sizes(), " after width ",
                s.h.back());
    s.h.push_back(w.size(0));
  }
  for (size_t l = 0; l < alphas.size(); ++l) {
    check_float(alphas[l], 1, "alpha");
    TORCH_CHECK(alphas[l].size(0) == s.h[l], "ctr_native din_unit: alpha ", l, " has ", alphas[l].size(0),
                " units, the layer ", s.h[l]);
  }
  TORCH_CHECK(w_out.size(0) == s.h.back(), "ctr_native din_unit: w_out must be [", s.h.back(), "]");
  const int64_t* fp = flat.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.n; ++i) {
    TORCH_CHECK(fp[i] >= 0 && fp[i] < s.m && rp[i] >= 0 && rp[i] < s.b, "ctr_native din_unit: row ", i,
                " (flat ", fp[i], ", sample ", rp[i], ") is outside the ", s.m, " keys or ", s.b, " samples");
    TORCH_CHECK(i == 0 || (fp[i] > fp[i - 1] && rp[i] >= rp[i - 1]),
                "ctr_native din_unit: flat must increase and rows must not decrease (row ", i, ")");
  }
  return s;
}

// per-group partials of `width` values, added into double totals in group order
template <typename T>
at::Tensor reduce_groups(const std::vector<T>& part, int64_t groups, int64_t width) {
  std::vector<double> tot(static_cast<size_t>(width), 0.0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = 0; j < width; ++j) tot[j] += part[g * width + j];
  }
  auto out = at::empty({width}, at::TensorOptions().dtype(at::kDouble));
  std::copy(tot.begin(), tot.end(), out.data_ptr<double>());
  return out;
}

}  // namespace din_unit_impl

// forward: [scores [N], x_0..x_{L-1} (pre-activations), mean_0.., invstd_0.., var_0.. (biased, float64; training)]
std::vector<at::Tensor> din_unit_forward(const at::Tensor& keys, const at::Tensor& flat, const at::Tensor& query,
                                         const at::Tensor& rows, const at::Tensor& qpart, const at::Tensor& w1,
                                         at::TensorList ws, at::TensorList bs, at::TensorList alphas,
                                         const at::Tensor& w_out, double b_out, at::TensorList means,
                                         at::TensorList invstds, double eps, bool keep, bool pool) {
  using namespace din_unit_impl;
  const Shapes s = check_inputs(keys, flat, query, rows, w1, ws, alphas, w_out);
  const int64_t n = s.n, d = s.d, layers = static_cast<int64_t>(s.h.size());
  check_float(qpart, 2, "qpart");
  TORCH_CHECK(qpart.size(0) == s.b && qpart.size(1) == s.h[0], "ctr_native din_unit: qpart must be [B, H]");
  TORCH_CHECK(static_cast<int64_t>(bs.size()) == layers - 1, "ctr_native din_unit: one bias per hidden layer after the first");
  const bool batch_stats = means.empty();
  TORCH_CHECK(batch_stats || (static_cast<int64_t>(means.size()) == layers && invstds.size() == means.size()),
              "ctr_native din_unit: means and invstds: one per hidden layer, or none (batch statistics)");
  const auto opt = keys.options();
  std::vector<at::Tensor> pre, mean(layers), invstd(layers), var(layers);
  std::vector<at::Tensor> sig;  // σ of each hidden layer's Dice, for backward (keep)
  for (int64_t l = 0; l < layers; ++l) pre.push_back(at::empty({n, s.h[l]}, opt));
  if (keep) {
    for (int64_t l = 0; l < layers; ++l) sig.push_back(at::empty({n, s.h[l]}, opt));
  }
  at::Tensor scores = at::empty({n}, opt);
  // with `pool`, DIN's weighted sum too, Σ_i s_i k_i per sample, in the scores' pass (`weighted_pool` in row order)
  at::Tensor pooled = pool ? at::zeros({s.b, d}, opt) : at::Tensor();
  const std::vector<int64_t> bounds = sample_groups(rows.data_ptr<int64_t>(), n);
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  const float *kp = keys.data_ptr<float>(), *qp = query.data_ptr<float>(), *qpp = qpart.data_ptr<float>(),
              *w1p = w1.data_ptr<float>();
  const int64_t *fp = flat.data_ptr<int64_t>(), *rp = rows.data_ptr<int64_t>();

  for (int64_t l = 0; l <= layers; ++l) {  // pass l: x_l from y_{l-1} (l = 0: from the inputs); pass L: the scores
    const int64_t hin = l == 0 ? 2 * d : s.h[l - 1];
    const int64_t hout = l < layers ? s.h[l] : 1;
    std::vector<double> part(static_cast<size_t>(groups * 2 * hout), 0.0);  // column sums, sums of squares
    const float *a = nullptr, *mp = nullptr, *ip = nullptr;
    if (l > 0) {
      a = alphas[l - 1].data_ptr<float>();
      mp = mean[l - 1].data_ptr<float>();
      ip = invstd[l - 1].data_ptr<float>();
    }
    if (l == 0) {
      float* x0 = pre[0].data_ptr<float>();
      unit_first_layer::forward_pass(kp, qp, qpp, fp, rp, bounds, w1p, d, hout, kBlockRows, x0, part);
    } else {
      at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
        std::vector<float> in(static_cast<size_t>(kBlockRows * hin)), acc(static_cast<size_t>(2 * hout));
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t r0 = bounds[g]; r0 < bounds[g + 1]; r0 += kBlockRows) {
            const int64_t r1 = std::min(bounds[g + 1], r0 + kBlockRows), nb = r1 - r0;
            const float* xin = pre[l - 1].data_ptr<float>() + r0 * hin;
            if (keep) {
              float* pk = sig[l - 1].data_ptr<float>() + r0 * hin;
              for (int64_t i = 0; i < nb; ++i) dice_p_row(xin + i * hin, a, mp, ip, in.data() + i * hin, pk + i * hin, hin);
            } else {
              for (int64_t i = 0; i < nb; ++i) dice_row(xin + i * hin, a, mp, ip, in.data() + i * hin, hin);
            }
            if (l == layers) {
              const float* w = w_out.data_ptr<float>();
              float* out = scores.data_ptr<float>() + r0;
              for (int64_t i = 0; i < nb; ++i) {
                out[i] = static_cast<float>(b_out) + ctr_native::dot(in.data() + i * hin, w, hin);
              }
              if (pool) {  // each sample within one group: its sum in row order, on one thread
                float* pp = pooled.data_ptr<float>();
                for (int64_t i = r0; i < r1; ++i) ctr_native::axpy(pp + rp[i] * d, out[i - r0], kp + fp[i] * d, d);
              }
              continue;
            }
            float* x = pre[l].data_ptr<float>() + r0 * hout;
            const float* bias = bs[l - 1].data_ptr<float>();
            for (int64_t i = 0; i < nb; ++i) std::copy_n(bias, hout, x + i * hout);
            gemm(false, true, nb, hout, hin, 1.0f, in.data(), hin, ws[l - 1].data_ptr<float>(), hin, 1.0f, x, hout);
            if (batch_stats) {
              std::fill(acc.begin(), acc.end(), 0.0f);
              for (int64_t i = 0; i < nb; ++i) sums_row(x + i * hout, acc.data(), acc.data() + hout, hout);
              double* pp = part.data() + g * 2 * hout;
              for (int64_t j = 0; j < 2 * hout; ++j) pp[j] += acc[j];
            }
          }
        }
      });
    }
    if (l == layers) break;
    if (batch_stats) {
      auto tot = reduce_groups(part, groups, 2 * hout).view({2, hout});
      auto m64 = tot[0] / static_cast<double>(std::max<int64_t>(n, 1));
      auto v64 = (tot[1] / static_cast<double>(std::max<int64_t>(n, 1)) - m64 * m64).clamp_min(0.0);
      mean[l] = m64.to(at::kFloat).contiguous();
      invstd[l] = (v64 + eps).rsqrt().to(at::kFloat).contiguous();
      var[l] = v64;
    } else {
      check_float(means[l], 1, "mean");
      check_float(invstds[l], 1, "invstd");
      mean[l] = means[l];
      invstd[l] = invstds[l];
      var[l] = at::empty({0}, opt.dtype(at::kDouble));
    }
  }
  std::vector<at::Tensor> out{scores};
  for (auto* v : {&pre, &mean, &invstd, &var, &sig}) out.insert(out.end(), v->begin(), v->end());
  if (pool) out.push_back(pooled);
  return out;
}

// backward through batch statistics: [grad keys [M, D], query [B, D], qpart [B, H_0], w1, w_2.., b_2..,
// alpha_1.., w_out, b_out (one value)]
std::vector<at::Tensor> din_unit_backward(const at::Tensor& grad, const at::Tensor& keys, const at::Tensor& flat,
                                          const at::Tensor& query, const at::Tensor& rows, const at::Tensor& w1,
                                          at::TensorList ws, at::TensorList alphas, const at::Tensor& w_out,
                                          at::TensorList pre, at::TensorList mean, at::TensorList invstd,
                                          at::TensorList sig, const std::optional<at::Tensor>& gpooled,
                                          const std::optional<at::Tensor>& scores) {
  using namespace din_unit_impl;
  const Shapes s = check_inputs(keys, flat, query, rows, w1, ws, alphas, w_out);
  const int64_t n = s.n, d = s.d, layers = static_cast<int64_t>(s.h.size());
  check_float(grad, 1, "grad");
  TORCH_CHECK(grad.size(0) == n && static_cast<int64_t>(pre.size()) == layers &&
                  static_cast<int64_t>(mean.size()) == layers && static_cast<int64_t>(invstd.size()) == layers,
              "ctr_native din_unit: backward's saved tensors do not match the layers");
  TORCH_CHECK(static_cast<int64_t>(sig.size()) == layers,
              "ctr_native din_unit: backward needs each hidden layer's σ (din_unit_forward with keep = true)");
  for (int64_t l = 0; l < layers; ++l) {
    for (const auto* t : {&pre[l], &sig[l]}) {
      check_float(*t, 2, "a saved layer");
      TORCH_CHECK(t->size(0) == n && t->size(1) == s.h[l], "ctr_native din_unit: layer ", l, "'s saved rows are ",
                  t->sizes(), ", not [", n, ", ", s.h[l], "]");
    }
  }
  const auto opt = keys.options();
  const std::vector<int64_t> bounds = sample_groups(rows.data_ptr<int64_t>(), n);
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  const float *kp = keys.data_ptr<float>(), *qp = query.data_ptr<float>(), *wo = w_out.data_ptr<float>();
  const int64_t *fp = flat.data_ptr<int64_t>(), *rp = rows.data_ptr<int64_t>();
  const double inv_n = 1.0 / static_cast<double>(std::max<int64_t>(n, 1));
  // with the pooling's gradient (`pool` forward): the scores' gradient gains <g_b, k_i> (the weighted sum's), and the
  // keys' its s_i g_b, added where the first layer writes them (below) instead of by autograd over another [M, D]
  const bool pooled = gpooled.has_value() && gpooled->defined();
  const float *gpp = nullptr, *sc = nullptr, *gp = grad.data_ptr<float>();
  if (pooled) {
    check_float(*gpooled, 2, "gpooled");
    TORCH_CHECK(gpooled->size(0) == s.b && gpooled->size(1) == d && scores.has_value() && scores->defined(),
                "ctr_native din_unit: gpooled must be [B, D], with the forward's scores");
    check_float(*scores, 1, "scores");
    TORCH_CHECK(scores->size(0) == n, "ctr_native din_unit: scores must be [N]");
    gpp = gpooled->data_ptr<float>();
    sc = scores->data_ptr<float>();
  }
  // row i's score gradient, read in the last layer's pass only (with the pooling, plus <g_b, k_i> computed there)
  const auto grad_at = [&](int64_t i) {
    return pooled ? gp[i] + ctr_native::dot(gpp + rp[i] * d, kp + fp[i] * d, d) : gp[i];
  };

  // the last hidden layer's Dice sums, its gradient being grad ⊗ w_out, with w_out's and b_out's gradients
  const int64_t hl = s.h.back();
  std::vector<at::Tensor> galpha(layers), gw(layers), gb(layers);
  at::Tensor gw_out, gb_out, a_last;
  std::vector<at::Tensor> m1(layers), m2(layers);
  {
    std::vector<double> part(static_cast<size_t>(groups * (4 * hl + 1)), 0.0);  // gw_out, ga, s1, s2, gb_out
    const float *x = pre[layers - 1].data_ptr<float>(), *a = alphas[layers - 1].data_ptr<float>(),
                *mp = mean[layers - 1].data_ptr<float>(), *ip = invstd[layers - 1].data_ptr<float>(),
                *sp = sig[layers - 1].data_ptr<float>();
    a_last = at::empty({n, hl}, opt);
    float* alp = a_last.data_ptr<float>();
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      std::vector<float> acc(static_cast<size_t>(4 * hl));
      for (int64_t gi = g0; gi < g1; ++gi) {
        for (int64_t r0 = bounds[gi]; r0 < bounds[gi + 1]; r0 += kBlockRows) {
          const int64_t r1 = std::min(bounds[gi + 1], r0 + kBlockRows);
          std::fill(acc.begin(), acc.end(), 0.0f);
          double bias = 0.0;
          for (int64_t i = r0; i < r1; ++i) {
            const float g_i = grad_at(i);
            last_sums_row(x + i * hl, sp + i * hl, g_i, wo, a, mp, ip, acc.data(), acc.data() + hl,
                          acc.data() + 2 * hl, acc.data() + 3 * hl, alp + i * hl, hl);
            bias += g_i;
          }
          double* pp = part.data() + gi * (4 * hl + 1);
          for (int64_t j = 0; j < 4 * hl; ++j) pp[j] += acc[j];
          pp[4 * hl] += bias;
        }
      }
    });
    auto tot = reduce_groups(part, groups, 4 * hl + 1);
    gw_out = tot.narrow(0, 0, hl).to(at::kFloat);
    galpha[layers - 1] = tot.narrow(0, hl, hl).to(at::kFloat);
    m1[layers - 1] = (tot.narrow(0, 2 * hl, hl) * inv_n).to(at::kFloat).contiguous();
    m2[layers - 1] = (tot.narrow(0, 3 * hl, hl) * inv_n).to(at::kFloat).contiguous();
    gb_out = tot.narrow(0, 4 * hl, 1).to(at::kFloat);
  }

  // layers L-1 .. 1: dx_l (in cache) -> the gradients of W_l, b_l, and y_{l-1}'s with Dice_{l-1}'s sums; what is
  // stored for the pass below is y_{l-1}'s gradient turned into Dice_{l-1}'s A rows (`dice_sums_a_row`)
  at::Tensor gy = a_last;  // A of layer l, [N, H_l]
  for (int64_t l = layers - 1; l >= 1; --l) {
    const int64_t ho = s.h[l], hi = s.h[l - 1];
    at::Tensor gy_prev = at::empty({n, hi}, opt);
    const int64_t width = ho + 3 * hi;  // gb and Dice_{l-1}'s ga, s1, s2
    std::vector<float> part_w(static_cast<size_t>(groups * ho * hi), 0.0f);  // gW, accumulated by the products
    std::vector<double> part(static_cast<size_t>(groups * width), 0.0);
    const float *x = pre[l].data_ptr<float>(), *mp = mean[l].data_ptr<float>(), *ip = invstd[l].data_ptr<float>(),
                *m1p = m1[l].data_ptr<float>(), *m2p = m2[l].data_ptr<float>();
    const float *xp = pre[l - 1].data_ptr<float>(), *ap = alphas[l - 1].data_ptr<float>(),
                *mpp = mean[l - 1].data_ptr<float>(), *ipp = invstd[l - 1].data_ptr<float>(),
                *spp = sig[l - 1].data_ptr<float>();
    std::vector<float> wpad(static_cast<size_t>(ho * unit_first_layer::pad_slab(hi)));
    unit_first_layer::pad_columns(ws[l - 1].data_ptr<float>(), ho, hi, wpad.data());
    const float* gyp = gy.data_ptr<float>();
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      std::vector<float> dx(static_cast<size_t>(kBlockRows * ho)), y(static_cast<size_t>(kBlockRows * hi)),
          acc(static_cast<size_t>(ho + 3 * hi));
      for (int64_t gi = g0; gi < g1; ++gi) {
        double* pp = part.data() + gi * width;
        float* pw = part_w.data() + gi * ho * hi;
        for (int64_t r0 = bounds[gi]; r0 < bounds[gi + 1]; r0 += kBlockRows) {
          const int64_t r1 = std::min(bounds[gi + 1], r0 + kBlockRows), nb = r1 - r0;
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t i = 0; i < nb; ++i) {
            float* dr = dx.data() + i * ho;
            dx_from_a_row(x + (r0 + i) * ho, gyp + (r0 + i) * ho, mp, ip, m1p, m2p, dr, ho);
            for (int64_t j = 0; j < ho; ++j) acc[j] += dr[j];
            dice_from_p_row(xp + (r0 + i) * hi, ap, spp + (r0 + i) * hi, y.data() + i * hi, hi);
          }
          gemm(true, false, ho, hi, nb, 1.0f, dx.data(), ho, y.data(), hi, 1.0f, pw, hi);  // gW += dxᵀ y
          float* gyr = gy_prev.data_ptr<float>() + r0 * hi;
          unit_first_layer::product(nb, ho, hi, dx.data(), ho, wpad.data(), gyr, hi);  // gy_{l-1} = dx W, then A
          for (int64_t i = 0; i < nb; ++i) {
            dice_sums_a_row(xp + (r0 + i) * hi, gyr + i * hi, spp + (r0 + i) * hi, ap, mpp, ipp, acc.data() + ho,
                            acc.data() + ho + hi, acc.data() + ho + 2 * hi, hi);
          }
          for (int64_t j = 0; j < width; ++j) pp[j] += acc[j];
        }
      }
    });
    auto tot = reduce_groups(part, groups, width);
    gw[l] = reduce_groups(part_w, groups, ho * hi).view({ho, hi}).to(at::kFloat);
    gb[l] = tot.narrow(0, 0, ho).to(at::kFloat);
    galpha[l - 1] = tot.narrow(0, ho, hi).to(at::kFloat);
    m1[l - 1] = (tot.narrow(0, ho + hi, hi) * inv_n).to(at::kFloat).contiguous();
    m2[l - 1] = (tot.narrow(0, ho + 2 * hi, hi) * inv_n).to(at::kFloat).contiguous();
    gy = gy_prev;
  }

  // the first layer: dx_0 -> qpart's, W_kp's, the keys' and the queries' gradients
  const int64_t h0 = s.h[0];
  // the keys' gradient: the rows read are written below; the rest (padding) zeroed here, not the whole block first
  at::Tensor gkeys = at::empty({s.m, d}, opt), gquery = at::zeros({s.b, d}, opt), gqpart = at::zeros({s.b, h0}, opt);
  for (int64_t i = 0, next = 0; i <= n; ++i) {  // next: the first row not yet written or zeroed
    const int64_t upto = i < n ? fp[i] : s.m;
    if (upto > next) std::fill(gkeys.data_ptr<float>() + next * d, gkeys.data_ptr<float>() + upto * d, 0.0f);
    next = upto + 1;
  }
  {
    const int64_t hp = unit_first_layer::pad_slab(h0), dp = unit_first_layer::pad_slab(d);
    std::vector<float> wpt(static_cast<size_t>(d * hp));
    unit_first_layer::transpose_weights(w1.data_ptr<float>(), h0, d, nullptr, wpt.data());
    std::vector<float> part_k(static_cast<size_t>(groups * d * hp), 0.0f), part_p(part_k.size(), 0.0f);
    const float *x = pre[0].data_ptr<float>(), *mp = mean[0].data_ptr<float>(), *ip = invstd[0].data_ptr<float>(),
                *m1p = m1[0].data_ptr<float>(), *m2p = m2[0].data_ptr<float>();
    const float* w = w1.data_ptr<float>();
    const float* gyp = gy.data_ptr<float>();
    float *gk = gkeys.data_ptr<float>(), *gq = gquery.data_ptr<float>(), *gqp = gqpart.data_ptr<float>();
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      // dx's rows hp apart, the columns from h0 on zero (the tiles read whole slabs)
      std::vector<float> dx(static_cast<size_t>(kBlockRows * hp), 0.0f), mt(static_cast<size_t>(h0 * dp));
      std::vector<const float*> krow(kBlockRows);
      std::vector<float*> gkrow(kBlockRows);
      for (int64_t gi = g0; gi < g1; ++gi) {
        float *pk = part_k.data() + gi * d * hp, *pw = part_p.data() + gi * d * hp;
        for (int64_t i0 = bounds[gi], i1; i0 < bounds[gi + 1]; i0 = i1) {
          i1 = unit_first_layer::sample_end(rp, i0, bounds[gi + 1]);
          const int64_t b = rp[i0];
          unit_first_layer::sample_matrix_t(w, qp + b * d, h0, d, mt.data());
          for (int64_t r0 = i0; r0 < i1; r0 += kBlockRows) {
            const int64_t nb = std::min(i1, r0 + kBlockRows) - r0;
            float* __restrict dst = gqp + b * h0;
            for (int64_t i = 0; i < nb; ++i) {
              float* dr = dx.data() + i * hp;
              dx_from_a_row(x + (r0 + i) * h0, gyp + (r0 + i) * h0, mp, ip, m1p, m2p, dr, h0);
              for (int64_t j = 0; j < h0; ++j) dst[j] += dr[j];
              krow[i] = kp + fp[r0 + i] * d;
              gkrow[i] = gk + fp[r0 + i] * d;
            }
            unit_first_layer::backward(nb, krow.data(), gkrow.data(), dx.data(), mt.data(), wpt.data(), qp + b * d,
                                       d, h0, pk, pw, gq + b * d);
            if (pooled) {
              for (int64_t i = 0; i < nb; ++i) ctr_native::add_scaled(gkrow[i], sc[r0 + i], gpp + b * d, d);
            }
          }
        }
      }
    });
    auto tk = reduce_groups(part_k, groups, d * hp).view({d, hp}).narrow(1, 0, h0);
    auto tp = reduce_groups(part_p, groups, d * hp).view({d, hp}).narrow(1, 0, h0);
    gw[0] = at::cat({tk.t(), tp.t()}, 1).to(at::kFloat).contiguous();
  }
  std::vector<at::Tensor> out{gkeys, gquery, gqpart, gw[0]};
  for (int64_t l = 1; l < layers; ++l) out.push_back(gw[l]);
  for (int64_t l = 1; l < layers; ++l) out.push_back(gb[l]);
  out.insert(out.end(), galpha.begin(), galpha.end());
  out.push_back(gw_out);
  out.push_back(gb_out);
  return out;
}

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def(
      "din_unit_forward(Tensor keys, Tensor flat, Tensor query, Tensor rows, Tensor qpart, Tensor w1, Tensor[] ws, "
      "Tensor[] bs, Tensor[] alphas, Tensor w_out, float b_out, Tensor[] means, Tensor[] invstds, float eps, bool keep, "
      "bool pool=False) -> Tensor[]");
  m.def(
      "din_unit_backward(Tensor grad, Tensor keys, Tensor flat, Tensor query, Tensor rows, Tensor w1, Tensor[] ws, "
      "Tensor[] alphas, Tensor w_out, Tensor[] pre, Tensor[] mean, Tensor[] invstd, Tensor[] sig, "
      "Tensor? gpooled=None, Tensor? scores=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("din_unit_forward", &din_unit_forward);
  m.impl("din_unit_backward", &din_unit_backward);
}
