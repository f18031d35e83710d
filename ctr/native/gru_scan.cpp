// The loops of ctr/modules/gru_scan.py (DIEN's GRU interest extractor and its AUGRU) on the CPU, one row at a time.
//
// A row's recurrence is a chain of small steps (a [3H x H] matrix-vector product and a dozen elementwise gates on
// H = 32 floats); PyTorch runs each step as a dozen ops over the whole [B, H] block, every one a pass through memory.
// Here each thread takes a block of rows and walks each row through all L steps with its state in registers and
// cache, writing the same saved tensors (states, gates, candidate) in the same time-major layout; the Python side
// (gru_scan.py) keeps everything else, the weight's gradient included. Forms and formulas: gru_scan.py's docstring.
// tests/test_native.py holds both loops equal to the PyTorch ones.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kFormTorch = 0, kFormPaper = 1, kFormOfficial = 2;

using ctr_native::sigmoid_f;
inline float tanh_f(float x) { return 2.0f * sigmoid_f(2.0f * x) - 1.0f; }  // as gru_scan.py's _tanh_into

// torch.lerp's formula: exact at both ends (a padded step keeps its state bit for bit)
inline float lerp_f(float start, float end, float w) {
  const float diff = end - start;
  return (w < 0.5f && w > -0.5f) ? start + w * diff : end - diff * (1.0f - w);
}

// y[0:m] = b[0:m] + sum_j v[j] * wt[j, 0:m]   (wt: [n, ld] row-major; the rows of W^T)
inline void matvec_t(const float* __restrict v, const float* __restrict wt, int64_t n, int64_t m, int64_t ld,
                     float* __restrict y) {
  for (int64_t j = 0; j < n; ++j) {
    const float s = v[j];
    const float* w = wt + j * ld;
    for (int64_t k = 0; k < m; ++k) y[k] += s * w[k];
  }
}

inline void sigmoid_add(const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = sigmoid_f(a[k] + b[k]);
}

// the gates after the products, one row and step; separate functions with restrict pointers so the loops vectorize
// "torch" / "paper": z = W_c h + b_c, c = tanh(gx_c + r z), g = p (g0 + g1 u) (torch: 1 − u, paper: u), h' = lerp(h, c, g)
void gates_gru(const float* __restrict xc, const float* __restrict ghc, const float* __restrict bc,
               const float* __restrict ru, const float* __restrict hp, float pt, float g0, float g1,
               float* __restrict z, float* __restrict c, float* __restrict g, float* __restrict hn, int64_t h) {
  for (int64_t k = 0; k < h; ++k) {
    z[k] = ghc[k] + bc[k];
    c[k] = tanh_f(xc[k] + ru[k] * z[k]);
    g[k] = pt * (g0 + g1 * ru[h + k]);
    hn[k] = lerp_f(hp[k], c[k], g[k]);
  }
}

// "official": c = tanh(pre), g = q + p u, h' = lerp(c, h, g)
void gates_official(const float* __restrict pre, const float* __restrict ru, const float* __restrict hp, float pt,
                    float qt, float* __restrict c, float* __restrict g, float* __restrict hn, int64_t h) {
  for (int64_t k = 0; k < h; ++k) {
    c[k] = tanh_f(pre[k]);
    g[k] = qt + pt * ru[h + k];
    hn[k] = lerp_f(c[k], hp[k], g[k]);
  }
}

// the backward through h' and the gates u and c, one row and step: writes d_prev (the state's direct share), d_g ⊙ u
// (for the attention's gradient), the pre-activation gradients of u and c into dg[H:3H] and d_pc
template <bool kOfficial>
void backward_gates(const float* __restrict d, const float* __restrict hp, const float* __restrict c,
                    const float* __restrict g, const float* __restrict ru, float du_scale, float* __restrict d_prev,
                    float* __restrict dgu, float* __restrict dg, float* __restrict d_pc, int64_t h) {
  for (int64_t k = 0; k < h; ++k) {
    const float g_dh = g[k] * d[k];
    const float d_c = kOfficial ? d[k] - g_dh : g_dh;  // official: h' = c + g (h − c); else h' = h + g (c − h)
    const float d_g = kOfficial ? (hp[k] - c[k]) * d[k] : (c[k] - hp[k]) * d[k];
    d_prev[k] = kOfficial ? g_dh : d[k] - g_dh;
    const float u = ru[h + k];
    dgu[k] = d_g * u;
    dg[h + k] = du_scale * d_g * u * (1.0f - u);
    d_pc[k] = d_c * (1.0f - c[k] * c[k]);
    dg[2 * h + k] = d_pc[k];
  }
}

// the reset gate's pre-activation gradient: "official" (c on W_c (r ⊙ h)): from d_rh = d_pc W_c, and the state's
// share through r ⊙ h; "torch" / "paper" (c on r ⊙ z): from d_pc, and z's gradient d_z = d_pc ⊙ r
void reset_official(const float* __restrict d_rh, const float* __restrict hp, const float* __restrict ru,
                    float* __restrict dg, float* __restrict d_prev, int64_t h) {
  for (int64_t k = 0; k < h; ++k) {
    dg[k] = d_rh[k] * hp[k] * ru[k] * (1.0f - ru[k]);
    d_prev[k] += d_rh[k] * ru[k];
  }
}

void reset_gru(const float* __restrict d_pc, const float* __restrict z, const float* __restrict ru,
               float* __restrict dg, float* __restrict dz, int64_t h) {
  for (int64_t k = 0; k < h; ++k) {
    dg[k] = d_pc[k] * z[k] * ru[k] * (1.0f - ru[k]);
    dz[k] = d_pc[k] * ru[k];
  }
}

inline void add_into(float* __restrict d, const float* __restrict s, int64_t h) {
  for (int64_t k = 0; k < h; ++k) d[k] += s[k];
}

void check(const at::Tensor& t, const char* what, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dims,
              "ctr_native gru_scan: ", what, " must be a contiguous float32 CPU tensor of ", dims, " dims, got ",
              t.sizes(), " ", t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

namespace {

// y[0:M] += sum_j v[j] * wt[j, 0:M] with M a multiple of 8 (at most 96) known at compile time: the M sums stay in
// named vector registers through the n rows of wt (an array of them, or the generic loop above, goes through the
// stack on every row); for M <= 48 the rows alternate between two sets of sums, so that the additions into one sum
// do not wait on each other (an FMA's latency is 4 cycles, two issue per cycle)
using v8 = float __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 r;
  __builtin_memcpy(&r, p, sizeof(r));
  return r;
}

inline void add8(float* p, v8 a) {
  v8 r = load8(p) + a;
  __builtin_memcpy(p, &r, sizeof(r));
}

template <int64_t M>
struct Sums {
  static_assert(M % 8 == 0 && M <= 96, "M must be a multiple of 8, at most 96");
  static constexpr int64_t K = M / 8;
  v8 a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{}, a8{}, a9{}, a10{}, a11{};

  inline void fma(v8 s, const float* w) {
    a0 += s * load8(w);
    if constexpr (K > 1) a1 += s * load8(w + 8);
    if constexpr (K > 2) a2 += s * load8(w + 16);
    if constexpr (K > 3) a3 += s * load8(w + 24);
    if constexpr (K > 4) a4 += s * load8(w + 32);
    if constexpr (K > 5) a5 += s * load8(w + 40);
    if constexpr (K > 6) a6 += s * load8(w + 48);
    if constexpr (K > 7) a7 += s * load8(w + 56);
    if constexpr (K > 8) a8 += s * load8(w + 64);
    if constexpr (K > 9) a9 += s * load8(w + 72);
    if constexpr (K > 10) a10 += s * load8(w + 80);
    if constexpr (K > 11) a11 += s * load8(w + 88);
  }

  inline void add_to(float* y) const {
    add8(y, a0);
    if constexpr (K > 1) add8(y + 8, a1);
    if constexpr (K > 2) add8(y + 16, a2);
    if constexpr (K > 3) add8(y + 24, a3);
    if constexpr (K > 4) add8(y + 32, a4);
    if constexpr (K > 5) add8(y + 40, a5);
    if constexpr (K > 6) add8(y + 48, a6);
    if constexpr (K > 7) add8(y + 56, a7);
    if constexpr (K > 8) add8(y + 64, a8);
    if constexpr (K > 9) add8(y + 72, a9);
    if constexpr (K > 10) add8(y + 80, a10);
    if constexpr (K > 11) add8(y + 88, a11);
  }
};

template <int64_t M>
inline void matvec_fixed(const float* __restrict v, const float* __restrict wt, int64_t n, int64_t ld,
                         float* __restrict y) {
  Sums<M> even, odd;
  int64_t j = 0;
  if constexpr (M <= 48) {
    for (; j + 1 < n; j += 2) {
      even.fma(v8{} + v[j], wt + j * ld);
      odd.fma(v8{} + v[j + 1], wt + (j + 1) * ld);
    }
  }
  for (; j < n; ++j) even.fma(v8{} + v[j], wt + j * ld);
  even.add_to(y);
  if constexpr (M <= 48) odd.add_to(y);
}

// matvec_t with M = m when m is one of the sizes compiled for (H = HC: m in {H, 2H, 3H}), else the generic loop
template <int64_t HC>
inline void matvec(const float* __restrict v, const float* __restrict wt, int64_t n, int64_t m, int64_t ld,
                   float* __restrict y) {
  if constexpr (HC > 0 && HC % 8 == 0) {
    if constexpr (HC <= 96)
      if (m == HC) return matvec_fixed<HC>(v, wt, n, ld, y);
    if constexpr (2 * HC <= 96)
      if (m == 2 * HC) return matvec_fixed<2 * HC>(v, wt, n, ld, y);
    if constexpr (3 * HC <= 96)
      if (m == 3 * HC) return matvec_fixed<3 * HC>(v, wt, n, ld, y);
  }
  matvec_t(v, wt, n, m, ld, y);
}

struct ForwardArgs {
  int64_t b, steps, h, form;
  const float *gx, *p, *q, *wt, *bc;
  float g0, g1;
  float *hs, *ru, *c, *g, *z;
};

// the forward over rows r0..r1, each through all steps; HC > 0: the state's size known at compile time
template <int64_t HC>
void forward_rows(const ForwardArgs& a, int64_t r0, int64_t r1) {
  const int64_t h = HC > 0 ? HC : a.h, b = a.b, steps = a.steps;
  std::vector<float> gh(3 * h), pre(h);
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t t = 0; t < steps; ++t) {
      const float* x = a.gx + (row * steps + t) * 3 * h;
      const int64_t at = t * b + row;
      const float* hp = a.hs + at * h;
      float* hn = a.hs + (at + b) * h;
      float* rut = a.ru + at * 2 * h;
      float *ct = a.c + at * h, *gt = a.g + at * h, *zt = a.z + at * h;
      const float pt = a.p[at];
      std::fill(gh.begin(), gh.end(), 0.0f);
      if (a.form == kFormOfficial) {
        matvec<HC>(hp, a.wt, h, 2 * h, 3 * h, gh.data());  // W_ru h
        sigmoid_add(x, gh.data(), rut, 2 * h);
        for (int64_t k = 0; k < h; ++k) zt[k] = rut[k] * hp[k];  // r ⊙ h
        std::copy(x + 2 * h, x + 3 * h, pre.begin());
        matvec<HC>(zt, a.wt + 2 * h, h, h, 3 * h, pre.data());  // gx_c + W_c (r ⊙ h)
        gates_official(pre.data(), rut, hp, pt, a.q[at], ct, gt, hn, h);
      } else {
        matvec<HC>(hp, a.wt, h, 3 * h, 3 * h, gh.data());  // W h
        sigmoid_add(x, gh.data(), rut, 2 * h);
        gates_gru(x + 2 * h, gh.data() + 2 * h, a.bc, rut, hp, pt, a.g0, a.g1, zt, ct, gt, hn, h);
      }
    }
  }
}

struct BackwardArgs {
  int64_t b, steps, h, form;
  const float *ds, *hs, *ru, *c, *g, *z, *keep, *p, *w;
  float *dh, *dgx, *dz, *da;
};

template <int64_t HC>
void backward_rows(const BackwardArgs& a, int64_t r0, int64_t r1) {
  const int64_t h = HC > 0 ? HC : a.h, b = a.b, steps = a.steps;
  const float* w_c = a.w + 2 * h * h;  // rows 2H..3H of W: [H, H]
  std::vector<float> d(h), d_prev(h), d_pc(h), d_g(h), d_rh(h);
  for (int64_t row = r0; row < r1; ++row) {
    std::copy(a.dh + row * h, a.dh + (row + 1) * h, d.begin());
    for (int64_t t = steps - 1; t >= 0; --t) {
      if (a.ds) add_into(d.data(), a.ds + (row * steps + t) * h, h);
      const int64_t at = t * b + row;
      const float* hp = a.hs + at * h;
      const float* rut = a.ru + at * 2 * h;
      const float *ct = a.c + at * h, *gt = a.g + at * h, *zt = a.z + at * h;
      float* dg = a.dgx + (row * steps + t) * 3 * h;  // [d_r | d_u | d_c] pre-activation gradients, batch-major
      const float pt = a.p[at];
      const float du_scale = a.form == kFormTorch ? -pt : pt;  // ∂g/∂u = p ("torch": −p)
      if (a.form == kFormOfficial)
        backward_gates<true>(d.data(), hp, ct, gt, rut, du_scale, d_prev.data(), d_g.data(), dg, d_pc.data(), h);
      else
        backward_gates<false>(d.data(), hp, ct, gt, rut, du_scale, d_prev.data(), d_g.data(), dg, d_pc.data(), h);
      if (a.da) {  // ∂g/∂a = keep ⊙ u ("official": −keep ⊙ u)
        float da = 0.0f;
        for (int64_t k = 0; k < h; ++k) da += d_g[k];
        a.da[at] = a.form == kFormOfficial ? -da * a.keep[at] : da * a.keep[at];
      }
      if (a.form == kFormOfficial) {  // c = tanh(gx_c + W_c (r ⊙ h))
        std::fill(d_rh.begin(), d_rh.end(), 0.0f);
        matvec<HC>(d_pc.data(), w_c, h, h, h, d_rh.data());  // d_pc @ W_c
        reset_official(d_rh.data(), hp, rut, dg, d_prev.data(), h);
      } else {  // c = tanh(gx_c + r ⊙ z), z = W_c h + b_c
        float* dzt = a.dz + at * h;
        reset_gru(d_pc.data(), zt, rut, dg, dzt, h);
        matvec<HC>(dzt, w_c, h, h, h, d_prev.data());  // + d_z @ W_c
      }
      matvec<HC>(dg, a.w, 2 * h, h, h, d_prev.data());  // + d_pru @ W_ru
      std::copy(d_prev.begin(), d_prev.end(), d.begin());
    }
    std::copy(d.begin(), d.end(), a.dh + row * h);
  }
}

// the rows in parallel (each row's arithmetic is the same whatever the split), at DIEN's state sizes compiled for
template <typename Args>
void over_rows(const Args& a, void (*f16)(const Args&, int64_t, int64_t), void (*f32)(const Args&, int64_t, int64_t),
               void (*f64)(const Args&, int64_t, int64_t), void (*fany)(const Args&, int64_t, int64_t)) {
  auto* f = a.h == 16 ? f16 : a.h == 32 ? f32 : a.h == 64 ? f64 : fany;
  at::parallel_for(0, a.b, 16, [&](int64_t r0, int64_t r1) { f(a, r0, r1); });
}

}  // namespace

// gx [B, L, 3H]; p, q [L, B] (q: "official" only); w_hh [3H, H]; b_c [H] or none ("official": none);
// writes hs [L + 1, B, H] (hs[0] given), ru [L, B, 2H], c, g, z [L, B, H]
void gru_scan_forward(const at::Tensor& gx, const at::Tensor& p, const std::optional<at::Tensor>& q,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_c, int64_t form, at::Tensor& hs,
                      at::Tensor& ru, at::Tensor& c, at::Tensor& g, at::Tensor& z) {
  check(gx, "gx", 3);
  check(p, "p", 2);
  check(w_hh, "w_hh", 2);
  for (auto* t : {&hs, &ru, &c, &g, &z}) check(*t, "a saved buffer", 3);
  const int64_t b = gx.size(0), steps = gx.size(1), h = w_hh.size(1);
  TORCH_CHECK(gx.size(2) == 3 * h && w_hh.size(0) == 3 * h, "ctr_native gru_scan: gx ", gx.sizes(), " and w_hh ",
              w_hh.sizes(), " disagree");
  TORCH_CHECK(form == kFormOfficial ? q.has_value() : !q.has_value(), "ctr_native gru_scan: q is the official form's");
  const at::Tensor wt = w_hh.t().contiguous();  // [H, 3H]: row j holds column j of W
  at::Tensor bc = b_c.has_value() ? b_c->contiguous() : at::zeros({h}, w_hh.options());
  check(bc, "b_c", 1);
  ForwardArgs a{b, steps, h, form, gx.data_ptr<float>(), p.data_ptr<float>(),
                q.has_value() ? q->data_ptr<float>() : nullptr, wt.data_ptr<float>(), bc.data_ptr<float>(),
                form == kFormTorch ? 1.0f : 0.0f, form == kFormTorch ? -1.0f : 1.0f,  // g = p (g0 + g1 u)
                hs.data_ptr<float>(), ru.data_ptr<float>(), c.data_ptr<float>(), g.data_ptr<float>(),
                z.data_ptr<float>()};
  over_rows(a, &forward_rows<16>, &forward_rows<32>, &forward_rows<64>, &forward_rows<0>);
}

// The backward loop: d_states [B, L, H] or none; the saved buffers as the forward wrote them; keep, p [L, B];
// writes dh [B, H] (in: the last state's gradient; out: h0's), d_gx [B, L, 3H] (batch-major, as gx: the input
// projection's backward reads it without a transposing copy), d_z [L, B, H] (not "official"),
// d_a [L, B] (when the attention needs a gradient)
void gru_scan_backward(const std::optional<at::Tensor>& d_states, const at::Tensor& hs, const at::Tensor& ru,
                       const at::Tensor& c, const at::Tensor& g, const at::Tensor& z, const at::Tensor& keep,
                       const at::Tensor& p, const at::Tensor& w_hh, int64_t form, at::Tensor& dh, at::Tensor& d_gx,
                       const std::optional<at::Tensor>& d_z, const std::optional<at::Tensor>& d_a) {
  check(w_hh, "w_hh", 2);
  check(dh, "dh", 2);
  check(d_gx, "d_gx", 3);
  check(keep, "keep", 2);
  check(p, "p", 2);
  for (const at::Tensor* t : {&hs, &ru, &c, &g, &z}) check(*t, "a saved buffer", 3);
  if (d_states.has_value()) check(*d_states, "d_states", 3);
  TORCH_CHECK(form == kFormOfficial || d_z.has_value(), "ctr_native gru_scan: d_z is needed by this form");
  BackwardArgs a{c.size(1), c.size(0), c.size(2), form,
                 d_states.has_value() ? d_states->data_ptr<float>() : nullptr, hs.data_ptr<float>(),
                 ru.data_ptr<float>(), c.data_ptr<float>(), g.data_ptr<float>(), z.data_ptr<float>(),
                 keep.data_ptr<float>(), p.data_ptr<float>(), w_hh.data_ptr<float>(), dh.data_ptr<float>(),
                 d_gx.data_ptr<float>(), d_z.has_value() ? d_z->data_ptr<float>() : nullptr,
                 d_a.has_value() ? d_a->data_ptr<float>() : nullptr};
  over_rows(a, &backward_rows<16>, &backward_rows<32>, &backward_rows<64>, &backward_rows<0>);
}

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def(
      "gru_scan_forward(Tensor gx, Tensor p, Tensor? q, Tensor w_hh, Tensor? b_c, int form, Tensor(a!) hs, "
      "Tensor(b!) ru, Tensor(c!) c, Tensor(d!) g, Tensor(e!) z) -> ()");
  m.def(
      "gru_scan_backward(Tensor? d_states, Tensor hs, Tensor ru, Tensor c, Tensor g, Tensor z, Tensor keep, "
      "Tensor p, Tensor w_hh, int form, Tensor(a!) dh, Tensor(b!) d_gx, Tensor(c!)? d_z, Tensor(d!)? d_a) -> ()");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("gru_scan_forward", &gru_scan_forward);
  m.impl("gru_scan_backward", &gru_scan_backward);
}
