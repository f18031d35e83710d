// SDIM's hash-bucket match and pooling (ctr/modules/hashing.py, `SimHashBucketPool`): for each behavior row i of
// sample b (rows offsets[b] .. offsets[b + 1]), the share of the m SimHash functions under which its code equals
// its target's, where bit j of function h's code of x is [x · r_hj >= 0] (`simhash_share`), and with the pooling,
// u_b = Σ_i share_i v_i (`simhash_pool_forward`: the mean over the functions of each one's bucket sum) and its
// backward, gv_i = share_i g_b (the share has no gradient). Eager, the codes are a product [m bits, D] x [D, N], a
// comparison, a weighted sum over the bits and a gather of the targets' codes, each a pass over [m bits, N], then a
// weighted sum; here each row's m bits products are made in registers, for a block of rows at a time, and a row
// whose share is not zero is added to its sample's sum while it is in cache (where the values are the hashed rows,
// one read of each). The products sum in their own fixed order, so a row whose projection lies within float
// rounding of zero may take the other bit than the eager product's (either is a valid SimHash); nothing depends on
// the thread count. tests/test_hashing_models.py holds both to the eager form.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace simhash_impl {

constexpr int64_t kSamplesPerItem = 32;

typedef float v8f __attribute__((vector_size(32)));

// a b + c, one rounding where the build has FMA (C++'s ISO mode does not contract a * b + c)
inline v8f fma8(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
  return reinterpret_cast<v8f>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// bit k of the result: lane k of a >= 0 (as the scalar comparison: false for NaN, true for -0)
inline uint64_t sign_bits(v8f a) {
#if defined(__AVX__)
  return static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(a), _mm256_setzero_ps(), _CMP_GE_OQ)));
#else
  uint64_t out = 0;
  for (int k = 0; k < 8; ++k) out |= static_cast<uint64_t>(a[k] >= 0.0f) << k;
  return out;
#endif
}

// the m codes of R rows of x (ld apart) at once, codes[r * m + h]: per row the same products as any other R (each
// lane's sum over the input columns in order, so a row's code does not depend on the rows beside it or on R); R rows
// give R independent chains of multiply-adds per register of the rotation (R = 8 / (W / 8): eight chains in flight,
// where one row's chain would wait on each multiply-add's latency)
template <int64_t W, int R>
inline void codes_block(const float* __restrict x, int64_t ld, const float* __restrict rt, int64_t d, int64_t m,
                        int64_t bits, uint64_t* __restrict codes) {
  constexpr int V = static_cast<int>(W / 8);
  v8f acc[R][V];  // registers: every loop over it is unrolled (an indexed array would live in memory)
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 32
    for (int v = 0; v < V; ++v) acc[r][v] = v8f{};
  }
  for (int64_t e = 0; e < d; ++e) {
    const float* r_e = rt + e * W;
#pragma GCC unroll 32
    for (int v = 0; v < V; ++v) {
      v8f rv;
      std::memcpy(&rv, r_e + 8 * v, sizeof(rv));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float xe = x[r * ld + e];
        acc[r][v] = fma8(v8f{xe, xe, xe, xe, xe, xe, xe, xe}, rv, acc[r][v]);
      }
    }
  }
  constexpr int64_t kWords = (W + 63) / 64;
  const uint64_t low = (uint64_t{1} << bits) - 1;
  for (int r = 0; r < R; ++r) {
    uint64_t sign[kWords] = {};  // bit k: product k >= 0
#pragma GCC unroll 32
    for (int v = 0; v < V; ++v) sign[v / 8] |= sign_bits(acc[r][v]) << (8 * (v % 8));
    for (int64_t h = 0; h < m; ++h) {  // function h's code: bits h bits .. h bits + bits - 1 of the products
      const int64_t pos = h * bits, word = pos / 64, off = pos % 64;
      uint64_t code = sign[word] >> off;
      if (off + bits > 64) code |= sign[word + 1] << (64 - off);
      codes[r * m + h] = code & low;
    }
  }
}

// SDIM's pooling for samples [s0, s1): each row's share of matching functions (`share`), and Σ share_i v_i per sample
// into out (row order, `ctr_native::axpy` as `weighted_pool` adds; rows of share 0 add nothing and are not read)
template <int64_t W>
void pool_samples(const float* xp, const float* tp, const int64_t* op, const float* rp, const float* vp, int64_t d,
                  int64_t dv, int64_t m, int64_t bits, float* sp, float* outp, int64_t s0, int64_t s1) {
  constexpr int R = W >= 64 ? 1 : static_cast<int>(64 / W);
  const float inv = 1.0f / static_cast<float>(m);
  std::vector<uint64_t> target(static_cast<size_t>(m)), codes(static_cast<size_t>(R * m));
  std::vector<float> tail(static_cast<size_t>(R * d));
  for (int64_t s = s0; s < s1; ++s) {
    if (op[s] == op[s + 1]) continue;
    codes_block<W, 1>(tp + s * d, d, rp, d, m, bits, target.data());
    float* __restrict o = outp == nullptr ? nullptr : outp + s * dv;
    for (int64_t i0 = op[s]; i0 < op[s + 1]; i0 += R) {
      const int64_t nr = std::min<int64_t>(R, op[s + 1] - i0);
      if (nr == R) {
        codes_block<W, R>(xp + i0 * d, d, rp, d, m, bits, codes.data());
      } else {  // the sample's last rows, through a block padded with zero rows (a row alone is one latency chain)
        std::copy_n(xp + i0 * d, nr * d, tail.data());
        std::fill(tail.begin() + nr * d, tail.end(), 0.0f);
        codes_block<W, R>(tail.data(), d, rp, d, m, bits, codes.data());
      }
      for (int64_t r = 0; r < nr; ++r) {
        int64_t same = 0;
        for (int64_t h = 0; h < m; ++h) same += codes[r * m + h] == target[h];
        const float w = static_cast<float>(same) * inv;
        sp[i0 + r] = w;
        if (same != 0 && vp != nullptr) ctr_native::axpy(o, w, vp + (i0 + r) * dv, dv);
      }
    }
  }
}

// the share of matching functions of each row of samples [s0, s1) into sp (`pool_samples` without the pooling)
template <int64_t W>
void share_samples(const float* xp, const float* tp, const int64_t* op, const float* rp, int64_t d, int64_t m,
                   int64_t bits, float* sp, int64_t s0, int64_t s1) {
  pool_samples<W>(xp, tp, op, rp, nullptr, d, 0, m, bits, sp, nullptr, s0, s1);
}

// the checks of both operators, and the rotation as [D, W] (column h bits + j: function h's bit j; W = m bits rounded
// up to a register block width, the columns past m bits zero)
at::Tensor rotation_columns(const at::Tensor& x, const at::Tensor& t, const at::Tensor& offsets,
                            const at::Tensor& rotation) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous() &&
                  t.size(1) == x.size(1),
              "ctr_native simhash: x [N, D] and t [B, D] must be contiguous float32 CPU tensors");
  TORCH_CHECK(rotation.scalar_type() == at::kFloat && rotation.dim() == 3 && rotation.size(1) == x.size(1) &&
                  rotation.size(2) <= 62,
              "ctr_native simhash: rotation must be float32 [m, D, bits <= 62]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.numel() == t.size(0) + 1,
              "ctr_native simhash: offsets must be a contiguous int64 [B + 1] tensor");
  const int64_t b = t.size(0), n = x.size(0), d = x.size(1), m = rotation.size(0), bits = rotation.size(2);
  const int64_t* op = offsets.data_ptr<int64_t>();
  TORCH_CHECK(b == 0 || (op[0] == 0 && op[b] == n), "ctr_native simhash: offsets must run from 0 to N = ", n);
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(op[i] <= op[i + 1], "ctr_native simhash: offsets must be nondecreasing");
  }
  const int64_t w = m * bits;
  TORCH_CHECK(w <= 256, "ctr_native simhash: at most 256 bits in all (num_hashes x hash_bits), got ", w);
  const int64_t width = w <= 8 ? 8 : (w <= 16 ? 16 : (w <= 64 ? 64 : 256));
  at::Tensor r = at::zeros({d, width}, x.options());
  r.narrow(1, 0, w).copy_(rotation.permute({1, 0, 2}).reshape({d, w}));
  return r;
}

// x [N, D] behaviors, t [B, D] targets, offsets [B + 1], rotation [m, D, bits] -> share [N]
at::Tensor simhash_share(const at::Tensor& x, const at::Tensor& t, const at::Tensor& offsets,
                         const at::Tensor& rotation) {
  const at::Tensor r = rotation_columns(x, t, offsets, rotation);
  const int64_t b = t.size(0), n = x.size(0), d = x.size(1), m = rotation.size(0), bits = rotation.size(2),
                width = r.size(1);
  const int64_t* op = offsets.data_ptr<int64_t>();
  at::Tensor share = at::empty({n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  float* sp = share.data_ptr<float>();
  at::parallel_for(0, b, kSamplesPerItem, [&](int64_t s0, int64_t s1) {
    switch (width) {
      case 8: return share_samples<8>(xp, tp, op, rp, d, m, bits, sp, s0, s1);
      case 16: return share_samples<16>(xp, tp, op, rp, d, m, bits, sp, s0, s1);
      case 64: return share_samples<64>(xp, tp, op, rp, d, m, bits, sp, s0, s1);
      default: return share_samples<256>(xp, tp, op, rp, d, m, bits, sp, s0, s1);
    }
  });
  return share;
}


// x [N, D] behaviors hashed, t [B, D] targets, offsets [B + 1], rotation [m, D, bits], values [N, Dv] pooled (undefined:
// x itself) -> [pooled [B, Dv], share [N]]
std::vector<at::Tensor> simhash_pool_forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& offsets,
                                             const at::Tensor& rotation, const std::optional<at::Tensor>& values) {
  const at::Tensor r = rotation_columns(x, t, offsets, rotation);
  const at::Tensor v = values.has_value() && values->defined() ? *values : x;
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 2 && v.is_contiguous() &&
                  v.size(0) == x.size(0),
              "ctr_native simhash_pool: values must be a contiguous float32 [N, Dv] CPU tensor, N = x's");
  const int64_t b = t.size(0), n = x.size(0), d = x.size(1), dv = v.size(1), m = rotation.size(0),
                bits = rotation.size(2), width = r.size(1);
  at::Tensor share = at::empty({n}, x.options());
  at::Tensor pooled = at::zeros({b, dv}, v.options());
  const float *xp = x.data_ptr<float>(), *tp = t.data_ptr<float>(), *rp = r.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  float *sp = share.data_ptr<float>(), *outp = pooled.data_ptr<float>();
  at::parallel_for(0, b, kSamplesPerItem, [&](int64_t s0, int64_t s1) {
    switch (width) {
      case 8: return pool_samples<8>(xp, tp, op, rp, vp, d, dv, m, bits, sp, outp, s0, s1);
      case 16: return pool_samples<16>(xp, tp, op, rp, vp, d, dv, m, bits, sp, outp, s0, s1);
      case 64: return pool_samples<64>(xp, tp, op, rp, vp, d, dv, m, bits, sp, outp, s0, s1);
      default: return pool_samples<256>(xp, tp, op, rp, vp, d, dv, m, bits, sp, outp, s0, s1);
    }
  });
  return {pooled, share};
}

// the values' gradient: row i of sample b gets share_i g_b (grad [B, Dv], share [N], offsets [B + 1])
at::Tensor simhash_pool_backward(const at::Tensor& grad, const at::Tensor& share, const at::Tensor& offsets) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.dim() == 2 && grad.is_contiguous() &&
                  share.scalar_type() == at::kFloat && share.dim() == 1 && share.is_contiguous() &&
                  offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == grad.size(0) + 1,
              "ctr_native simhash_pool: grad [B, Dv], share [N] float32 and offsets [B + 1] int64, contiguous");
  const int64_t b = grad.size(0), dv = grad.size(1), n = share.size(0);
  const int64_t* op = offsets.data_ptr<int64_t>();
  TORCH_CHECK(b == 0 || (op[0] == 0 && op[b] == n), "ctr_native simhash_pool: offsets must run from 0 to N = ", n);
  at::Tensor gv = at::empty({n, dv}, grad.options());
  const float *gp = grad.data_ptr<float>(), *sp = share.data_ptr<float>();
  float* gvp = gv.data_ptr<float>();
  at::parallel_for(0, b, kSamplesPerItem, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const float* __restrict g = gp + s * dv;
      for (int64_t i = op[s]; i < op[s + 1]; ++i) {
        float* __restrict o = gvp + i * dv;
        const float a = sp[i];
        for (int64_t j = 0; j < dv; ++j) o[j] = a * g[j];
      }
    }
  });
  return gv;
}

}  // namespace simhash_impl

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("simhash_share(Tensor x, Tensor t, Tensor offsets, Tensor rotation) -> Tensor");
  m.def("simhash_pool_forward(Tensor x, Tensor t, Tensor offsets, Tensor rotation, Tensor? values) -> Tensor[]");
  m.def("simhash_pool_backward(Tensor grad, Tensor share, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("simhash_share", &simhash_impl::simhash_share);
  m.impl("simhash_pool_forward", &simhash_impl::simhash_pool_forward);
  m.impl("simhash_pool_backward", &simhash_impl::simhash_pool_backward);
}
