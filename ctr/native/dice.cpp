// Dice (DIN, Zhou et al. 2018) on the CPU in fused passes: f(x) = x * (alpha + (1 - alpha) * sigmoid(x_hat)),
// x_hat = (x - mean) * invstd per column of a row-major [N, H] float block.
//
// Eager PyTorch runs Dice as a chain of about ten elementwise passes forward and twenty backward over [N, H]
// blocks (N: every real behavior of a batch), each through memory; here the forward is one pass of column sums and
// one of outputs, the backward one pass of column sums and one of input gradients. The Python side
// (ctr/native/__init__.py) holds the autograd function, the running statistics and the fallback to eager PyTorch;
// tests/test_native.py holds every output and gradient equal to the eager module.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dice_rows.h"
#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using ctr_native::dice_dx_row;
using ctr_native::dice_row;
using ctr_native::sigmoid_f;

constexpr int64_t kRows = 512;  // rows per parallel block of the column sums



// the loops over one row's H columns: separate functions with restrict pointers so the compiler vectorizes them
void sums_row(const float* __restrict x, double* __restrict s, double* __restrict q, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const double v = x[j];
    s[j] += v;
    q[j] += v * v;
  }
}

// per column: ga += g x (1 - p) (alpha's gradient), s1 += g_xhat, s2 += g_xhat * x_hat (the batch norm's sums)
void backward_sums_row(const float* __restrict x, const float* __restrict g, const float* __restrict a,
                       const float* __restrict m, const float* __restrict is, float* __restrict ga,
                       float* __restrict s1, float* __restrict s2, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float xh = (x[j] - m[j]) * is[j];
    const float p = sigmoid_f(xh);
    const float t = g[j] * x[j];
    ga[j] += t * (1.0f - p);
    const float gxh = t * (1.0f - a[j]) * p * (1.0f - p);
    s1[j] += gxh;
    s2[j] += gxh * xh;
  }
}

void check_block(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "ctr_native dice: ", what, " must be a contiguous float32 [N, H] CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
}

void check_column(const at::Tensor& v, int64_t h, const char* what) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == h &&
                  v.is_contiguous(),
              "ctr_native dice: ", what, " must be a contiguous float32 [", h, "] CPU tensor, got ", v.sizes());
}

int64_t blocks_of(int64_t n) { return (n + kRows - 1) / kRows; }

}  // namespace

// column sums and sums of squares of x [N, H], accumulated in float64: [2, H]
at::Tensor dice_column_sums(const at::Tensor& x) {
  check_block(x, "x");
  const int64_t n = x.size(0), h = x.size(1), blocks = blocks_of(n);
  auto part = at::zeros({blocks, 2, h}, x.options().dtype(at::kDouble));
  const float* xp = x.data_ptr<float>();
  double* pp = part.data_ptr<double>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* s = pp + b * 2 * h;
      for (int64_t i = b * kRows, end = std::min(n, (b + 1) * kRows); i < end; ++i) sums_row(xp + i * h, s, s + h, h);
    }
  });
  return part.sum(0);
}

at::Tensor dice_forward(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& mean,
                        const at::Tensor& invstd) {
  check_block(x, "x");
  const int64_t n = x.size(0), h = x.size(1);
  check_column(alpha, h, "alpha");
  check_column(mean, h, "mean");
  check_column(invstd, h, "invstd");
  auto out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *ap = alpha.data_ptr<float>(), *mp = mean.data_ptr<float>(),
              *ip = invstd.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, kRows, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) dice_row(xp + i * h, ap, mp, ip, op + i * h, h);
  });
  return out;
}

// the gradients of x and alpha through f with batch statistics (mean and invstd functions of x): (dx, dalpha)
std::tuple<at::Tensor, at::Tensor> dice_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& alpha,
                                                 const at::Tensor& mean, const at::Tensor& invstd) {
  check_block(x, "x");
  check_block(grad, "grad");
  const int64_t n = x.size(0), h = x.size(1), blocks = blocks_of(n);
  TORCH_CHECK(grad.sizes() == x.sizes(), "ctr_native dice: grad ", grad.sizes(), " and x ", x.sizes(), " differ");
  check_column(alpha, h, "alpha");
  check_column(mean, h, "mean");
  check_column(invstd, h, "invstd");
  auto part = at::zeros({blocks, 3, h}, x.options().dtype(at::kDouble));
  const float *xp = x.data_ptr<float>(), *gp = grad.data_ptr<float>(), *ap = alpha.data_ptr<float>(),
              *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  double* pp = part.data_ptr<double>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(3 * h);  // a block's sums in float (512 rows), the blocks' totals in float64
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t i = b * kRows, end = std::min(n, (b + 1) * kRows); i < end; ++i)
        backward_sums_row(xp + i * h, gp + i * h, ap, mp, ip, acc.data(), acc.data() + h, acc.data() + 2 * h, h);
      std::copy(acc.begin(), acc.end(), pp + b * 3 * h);
    }
  });
  auto tot = part.sum(0);
  auto dalpha = tot[0].to(at::kFloat);
  auto m1 = (tot[1] / static_cast<double>(n)).to(at::kFloat).contiguous();
  auto m2 = (tot[2] / static_cast<double>(n)).to(at::kFloat).contiguous();
  auto dx = at::empty_like(x);
  const float *m1p = m1.data_ptr<float>(), *m2p = m2.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, n, kRows, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) dice_dx_row(xp + i * h, gp + i * h, ap, mp, ip, m1p, m2p, dp + i * h, h);
  });
  return {dx, dalpha};
}

TORCH_LIBRARY(ctr_native, m) {
  m.def("dice_column_sums(Tensor x) -> Tensor");
  m.def("dice_forward(Tensor x, Tensor alpha, Tensor mean, Tensor invstd) -> Tensor");
  m.def("dice_backward(Tensor grad, Tensor x, Tensor alpha, Tensor mean, Tensor invstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("dice_column_sums", &dice_column_sums);
  m.impl("dice_forward", &dice_forward);
  m.impl("dice_backward", &dice_backward);
}
