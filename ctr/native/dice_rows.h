// Dice's row loops shared by dice.cpp (Dice alone) and din_unit.cpp (DIN's activation unit): one row of H columns,
// restrict pointers so that the compiler vectorizes them. x_hat = (x − mean) · invstd, p = σ(x_hat).
#pragma once

#include <cstdint>

#include "vec_math.h"

namespace ctr_native {

// y = x (α + (1 − α) p)
inline void dice_row(const float* __restrict x, const float* __restrict a, const float* __restrict m,
                     const float* __restrict is, float* __restrict y, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float p = sigmoid_f((x[j] - m[j]) * is[j]);
    y[j] = x[j] * (a[j] + (1.0f - a[j]) * p);
  }
}

// dx = g (α + (1 − α) p) + invstd (g_xhat − mean(g_xhat) − x_hat mean(g_xhat x_hat)), the batch norm's backward
// with m1 = mean(g_xhat) and m2 = mean(g_xhat x_hat) over the rows, g_xhat = g x (1 − α) p (1 − p)
inline void dice_dx_row(const float* __restrict x, const float* __restrict g, const float* __restrict a,
                        const float* __restrict m, const float* __restrict is, const float* __restrict m1,
                        const float* __restrict m2, float* __restrict d, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float xh = (x[j] - m[j]) * is[j];
    const float p = sigmoid_f(xh);
    const float gxh = g[j] * x[j] * (1.0f - a[j]) * p * (1.0f - p);
    d[j] = g[j] * (a[j] + (1.0f - a[j]) * p) + is[j] * (gxh - m1[j] - xh * m2[j]);
  }
}

// The rows of DIN's activation unit (din_unit.cpp), which keeps each Dice's σ (p) from forward for backward.

// Dice forward keeping σ: y = x (α + (1 − α) p), p = σ(x_hat) into p
inline void dice_p_row(const float* __restrict x, const float* __restrict a, const float* __restrict m,
                       const float* __restrict is, float* __restrict y, float* __restrict p, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    p[j] = sigmoid_f((x[j] - m[j]) * is[j]);
    y[j] = x[j] * (a[j] + (1.0f - a[j]) * p[j]);
  }
}

// Dice's output from its stored σ: y = x (α + (1 − α) p)
inline void dice_from_p_row(const float* __restrict x, const float* __restrict a, const float* __restrict p,
                            float* __restrict y, int64_t h) {
  for (int64_t j = 0; j < h; ++j) y[j] = x[j] * (a[j] + (1.0f - a[j]) * p[j]);
}

// Dice's backward sums with σ already computed (p), and the row's share of its input gradient that needs no batch
// sums, written over g: dx = A − invstd (m1 + x_hat m2) with A = g (α + (1 − α) p) + invstd g_xhat (`dice_dx_row`
// split in two), so that the pass after the sums (`dx_from_a_row`) needs no σ again
inline void dice_sums_a_row(const float* __restrict x, float* __restrict g, const float* __restrict p,
                            const float* __restrict a, const float* __restrict m, const float* __restrict is,
                            float* __restrict ga, float* __restrict s1, float* __restrict s2, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float xh = (x[j] - m[j]) * is[j];
    const float t = g[j] * x[j];
    ga[j] += t * (1.0f - p[j]);
    const float gxh = t * (1.0f - a[j]) * p[j] * (1.0f - p[j]);
    s1[j] += gxh;
    s2[j] += gxh * xh;
    g[j] = g[j] * (a[j] + (1.0f - a[j]) * p[j]) + is[j] * gxh;
  }
}

// the last hidden layer's row for backward: its gradient is g = gs w_out; gw_out += gs y, and Dice's sums and the
// row's A (`dice_sums_a_row`) into ar
inline void last_sums_row(const float* __restrict x, const float* __restrict p, float gs, const float* __restrict wo,
                          const float* __restrict a, const float* __restrict m, const float* __restrict is,
                          float* __restrict gwo, float* __restrict ga, float* __restrict s1, float* __restrict s2,
                          float* __restrict ar, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    gwo[j] += gs * x[j] * (a[j] + (1.0f - a[j]) * p[j]);
    ar[j] = gs * wo[j];
  }
  dice_sums_a_row(x, ar, p, a, m, is, ga, s1, s2, h);
}

// dx = A − invstd (m1 + x_hat m2), A from `dice_sums_a_row`
inline void dx_from_a_row(const float* __restrict x, const float* __restrict ar, const float* __restrict m,
                          const float* __restrict is, const float* __restrict m1, const float* __restrict m2,
                          float* __restrict d, int64_t h) {
  for (int64_t j = 0; j < h; ++j) d[j] = ar[j] - is[j] * (m1[j] + (x[j] - m[j]) * is[j] * m2[j]);
}

inline void sums_row(const float* __restrict x, float* __restrict s, float* __restrict q, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    s[j] += x[j];
    q[j] += x[j] * x[j];
  }
}

}  // namespace ctr_native
