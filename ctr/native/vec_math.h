// Vectorizable float math shared by the native operators (dice.cpp, gru_scan.cpp, dot_pool.cpp, token_attention.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace ctr_native {

// exp(x) for float: Cephes' range reduction and degree-5 polynomial (about 1 ulp on [-87, 88]), branch-free so
// that the loops calling it vectorize (with -fno-math-errno -fno-trapping-math)
inline float exp_f(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return y * scale;
}

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// <a, b> over n floats in eight partial sums, combined pairwise. A float sum in one accumulator does not vectorize
// (its order is fixed: n dependent multiply-adds, four cycles apart); eight lanes are one vector register, so a
// 32-wide product is four vector multiply-adds. The order is the same on every call: results do not depend on
// threads or on where the rows lie in memory.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    for (int k = 0; k < 8; ++k) lane[k] += a[e + k] * b[e + k];
  }
  float acc = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
  for (; e < n; ++e) acc += a[e] * b[e];
  return acc;
}

// o += a x over n floats: a weighted sum's step (`weighted_pool.cpp`, DIN's unit with its pooling)
inline void axpy(float* __restrict o, float a, const float* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] += a * x[j];
}

// o += (a x), the product rounded before the sum (never one fused multiply-add): a gradient that autograd would
// add as a separate term (`din_unit.cpp` adds its pooling's share to the keys' gradient so), so the sum is the same
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
inline void add_scaled(float* __restrict o, float a, const float* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float t = a * x[j];
    o[j] = o[j] + t;
  }
}

}  // namespace ctr_native
