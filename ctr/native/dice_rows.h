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

}  // namespace ctr_native
