// SDIM's hash-bucket match (ctr/modules/hashing.py, `SimHashBucketPool.match_share`): for each behavior row i of
// sample b (rows offsets[b] .. offsets[b + 1]), the share of the m SimHash functions under which its code equals
// its target's, where bit j of function h's code of x is [x · r_hj >= 0]. The pooling after it is a weighted sum
// (`weighted_pool.cpp`). Eager, the codes are a product [m bits, D] x [D, N], a comparison, a weighted sum over the
// bits and a gather of the targets' codes, each a pass over [m bits, N]; here each row's m bits products are made
// in registers and only the share is written. The products sum in their own fixed order, so a row whose projection
// lies within float rounding of zero may take the other bit than the eager product's (either is a valid SimHash);
// the share does not depend on the thread count. tests/test_sdim.py holds it to the eager form.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace simhash_impl {

constexpr int64_t kSamplesPerItem = 32;

// the m codes of x [D] into codes[m]: its products with every direction at once, rt [D, W] (the m bits directions,
// zero-padded to W columns: a row of multiply-adds per input column across the bits, in W / 8 vector registers, no
// horizontal sum per product), then the signs
typedef float v8f __attribute__((vector_size(32)));

template <int64_t W>
inline void codes_of(const float* __restrict x, const float* __restrict rt, int64_t d, int64_t m, int64_t bits,
                     uint64_t* __restrict codes) {
  // four partial sums over the input columns: one chain of d dependent multiply-adds per register would wait on
  // each one's latency
  constexpr int64_t V = W / 8;
  v8f acc[4][V];
  for (auto& a : acc) {
    for (int64_t v = 0; v < V; ++v) a[v] = v8f{};
  }
  int64_t e = 0;
  for (; e + 4 <= d; e += 4) {
    for (int64_t u = 0; u < 4; ++u) {
      const float xe = x[e + u];
      const float* r = rt + (e + u) * W;
      for (int64_t v = 0; v < V; ++v) {
        v8f rv;
        std::memcpy(&rv, r + 8 * v, sizeof(rv));
        acc[u][v] += xe * rv;
      }
    }
  }
  for (; e < d; ++e) {
    const float xe = x[e];
    const float* r = rt + e * W;
    for (int64_t v = 0; v < V; ++v) {
      v8f rv;
      std::memcpy(&rv, r + 8 * v, sizeof(rv));
      acc[0][v] += xe * rv;
    }
  }
  for (int64_t v = 0; v < V; ++v) acc[0][v] = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
  float p[W];
  std::memcpy(p, acc[0], sizeof(p));
  for (int64_t h = 0; h < m; ++h) {
    uint64_t code = 0;
    for (int64_t j = 0; j < bits; ++j) code |= static_cast<uint64_t>(p[h * bits + j] >= 0.0f) << j;
    codes[h] = code;
  }
}

template <int64_t W>
void share_samples(const float* xp, const float* tp, const int64_t* op, const float* rp, int64_t d, int64_t m,
                   int64_t bits, float* sp, int64_t s0, int64_t s1) {
  const float inv = 1.0f / static_cast<float>(m);
  uint64_t target[W], codes[W];
  for (int64_t s = s0; s < s1; ++s) {
    if (op[s] == op[s + 1]) continue;
    codes_of<W>(tp + s * d, rp, d, m, bits, target);
    for (int64_t i = op[s]; i < op[s + 1]; ++i) {
      codes_of<W>(xp + i * d, rp, d, m, bits, codes);
      int64_t same = 0;
      for (int64_t h = 0; h < m; ++h) same += codes[h] == target[h];
      sp[i] = static_cast<float>(same) * inv;
    }
  }
}

// x [N, D] behaviors, t [B, D] targets, offsets [B + 1], rotation [m, D, bits] -> share [N]
at::Tensor simhash_share(const at::Tensor& x, const at::Tensor& t, const at::Tensor& offsets,
                         const at::Tensor& rotation) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous() &&
                  t.size(1) == x.size(1),
              "ctr_native simhash_share: x [N, D] and t [B, D] must be contiguous float32 CPU tensors");
  TORCH_CHECK(rotation.scalar_type() == at::kFloat && rotation.dim() == 3 && rotation.size(1) == x.size(1) &&
                  rotation.size(2) <= 62,
              "ctr_native simhash_share: rotation must be float32 [m, D, bits <= 62]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.numel() == t.size(0) + 1,
              "ctr_native simhash_share: offsets must be a contiguous int64 [B + 1] tensor");
  const int64_t b = t.size(0), n = x.size(0), d = x.size(1), m = rotation.size(0), bits = rotation.size(2);
  const int64_t* op = offsets.data_ptr<int64_t>();
  TORCH_CHECK(b == 0 || (op[0] == 0 && op[b] == n), "ctr_native simhash_share: offsets must run from 0 to N = ", n);
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(op[i] <= op[i + 1], "ctr_native simhash_share: offsets must be nondecreasing");
  }
  const int64_t w = m * bits;
  TORCH_CHECK(w <= 256, "ctr_native simhash_share: at most 256 bits in all (num_hashes x hash_bits), got ", w);
  const int64_t width = w <= 8 ? 8 : (w <= 16 ? 16 : (w <= 64 ? 64 : 256));
  at::Tensor r = at::zeros({d, width}, x.options());  // [D, W]: column h bits + j is function h's bit j
  r.narrow(1, 0, w).copy_(rotation.permute({1, 0, 2}).reshape({d, w}));
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

}  // namespace simhash_impl

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("simhash_share(Tensor x, Tensor t, Tensor offsets, Tensor rotation) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) { m.impl("simhash_share", &simhash_impl::simhash_share); }
