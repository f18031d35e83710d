// The first layer of DIN's activation unit one sample at a time (din_unit.cpp). With the query's share (qpart)
// apart, the layer on a behavior k of sample b is
//   x = W_k' k + W_p (q_b ⊙ k) = M_bᵀ k,   M_b[p, c] = W_k'[c, p] + q_b[p] W_p[c, p],
// one [D, H] matrix per sample. A batch's block product on [k; q ⊙ k] (2D inputs) does twice the multiply-adds of
// the per-sample products on k (D inputs), and so do its two backward products: with dx the layer's gradient,
//   dk = M_b dx,   dM_b = Σ_i k_i dx_iᵀ,   dW_k'ᵀ += dM_b,   dW_pᵀ += diag(q_b) dM_b,   dq_b[p] = Σ_c W_p[c, p] dM_b[p, c]
// (the last two from M_b's dependence on q_b), each a product of the sample's ~40 rows with a [D, H] matrix.
// BLAS on such small products spends most of its time packing; here they run through one register tile
// (6 rows x 16 columns, 12 vector accumulators) with M_b built in cache per sample, and each tile's epilogue does the
// bookkeeping (the column sums of the batch statistics forward; the weights' and the query's gradients backward)
// while the tile is still in registers.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// the vector type of the tiles: one AVX-512 register (16 floats) where the build targets AVX-512 (`ctr.native`'s
// flags follow the instruction set torch dispatches to), else 8 floats, one AVX register (two SSE or NEON ones where
// the build targets no AVX; the functions taking and returning it are inline, so GCC's warning that such a build
// passes them differently does not apply; it comes at the end of the translation unit, hence not popped)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace unit_first_layer {

#if defined(__AVX512F__)
#define CTR_UNIT_LANES 16
#else
#define CTR_UNIT_LANES 8
#endif
constexpr int kLanes = CTR_UNIT_LANES;
typedef float vec __attribute__((vector_size(CTR_UNIT_LANES * 4)));

inline vec loadv(const float* p) {
  vec r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void storev(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
inline vec splat(float x) { return vec{} + x; }
inline vec fmav(vec a, vec b, vec c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vec>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
#elif defined(__FMA__)
  return reinterpret_cast<vec>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}
// the lanes' sum in a fixed order: halves added until four lanes are left, then ((l0 + l1) + (l2 + l3))
inline float hsum(vec v) {
  float l[kLanes];
  storev(l, v);
  for (int w = kLanes / 2; w >= 4; w /= 2) {
    for (int j = 0; j < w; ++j) l[j] += l[j + w];
  }
  return (l[0] + l[1]) + (l[2] + l[3]);
}

constexpr int kTile = 6;            // rows of a register tile
constexpr int kSlab = 2 * kLanes;  // its columns (two vectors): 16 with AVX, 32 with AVX-512

inline int64_t pad_slab(int64_t n) { return (n + kSlab - 1) / kSlab * kSlab; }

// acc[r] = Σ_k a(r, k) b[k, 0:kSlab] for r < R, b's rows ldb apart; with V = 1 the slab's first vector only (its
// second half past the matrix's last column: acc[r][1] = 0, no multiply-adds on the zero padding)
// (the sums in locals, copied out at the end: summed into `acc` itself, which the epilogue reads by reference, the
// compiler stored every accumulator on every step, a third of the speed)
template <int R, int V, typename A>
inline void tile(int64_t kd, const A& a, const float* __restrict b, int64_t ldb, vec (&acc)[kTile][2]) {
  vec c0[R], c1[R];
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = splat(0.0f);
  for (int64_t k = 0; k < kd; ++k) {
    const vec b0 = loadv(b + k * ldb);
    const vec b1 = V == 2 ? loadv(b + k * ldb + kLanes) : splat(0.0f);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const vec av = splat(a(r, k));
      c0[r] = fmav(av, b0, c0[r]);
      if (V == 2) c1[r] = fmav(av, b1, c1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0] = c0[r];
    acc[r][1] = c1[r];
  }
}

template <int V, typename A>
inline void tile_rows(int n, int64_t kd, const A& a, const float* b, int64_t ldb, vec (&acc)[kTile][2]) {
  switch (n) {
    case 6: return tile<6, V>(kd, a, b, ldb, acc);
    case 5: return tile<5, V>(kd, a, b, ldb, acc);
    case 4: return tile<4, V>(kd, a, b, ldb, acc);
    case 3: return tile<3, V>(kd, a, b, ldb, acc);
    case 2: return tile<2, V>(kd, a, b, ldb, acc);
    default: return tile<1, V>(kd, a, b, ldb, acc);
  }
}

// every row tile of `rows` rows (the last one shorter) and slab of the `cols` columns (b's rows zero from `cols` to
// pad_slab(cols)): tile, then epi(row0, R, slab, acc); a last slab of at most kLanes columns through a one-vector
// tile (with AVX-512's 32-column slabs, H = 80 is two slabs and a half)
template <typename A, typename E>
inline void tiles(int64_t rows, int64_t cols, int64_t kd, const A& a, const float* b, int64_t ldb, const E& epi) {
  vec acc[kTile][2];
  const int64_t slabs = pad_slab(cols) / kSlab;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, rows - r0));
    const auto ar = [&](int r, int64_t k) { return a(r0 + r, k); };
    for (int64_t s = 0; s < slabs; ++s) {
      const float* bs = b + s * kSlab;
      if (cols - s * kSlab <= kLanes) {
        tile_rows<1>(n, kd, ar, bs, ldb, acc);
      } else {
        tile_rows<2>(n, kd, ar, bs, ldb, acc);
      }
      epi(r0, n, s, acc);
    }
  }
}

// a tile's row (kSlab values) into o, of which the first `valid` are kept (the last slab of a width not a multiple of kSlab)
inline void store_row(float* o, const vec (&row)[2], int64_t valid) {
  if (valid >= kSlab) {
    storev(o, row[0]);
    storev(o + kLanes, row[1]);
    return;
  }
  float v[kSlab];
  storev(v, row[0]);
  storev(v + kLanes, row[1]);
  for (int64_t j = 0; j < valid; ++j) o[j] = v[j];
}

// c = a b for a [rows, k] (rows lda apart) and b [k, pad_slab(n)] (zero past column n): through the tile, for the
// products whose inner dimension is too short for BLAS to run near its rate (a hidden layer's backward, k = 40)
inline void product(int64_t rows, int64_t k, int64_t n, const float* a, int64_t lda, const float* b, float* c,
                    int64_t ldc) {
  const int64_t np = pad_slab(n);
  const auto aa = [&](int64_t r, int64_t kk) { return a[r * lda + kk]; };
  tiles(rows, n, k, aa, b, np, [&](int64_t r0, int nr, int64_t s, vec (&acc)[kTile][2]) {
    const int64_t c0 = s * kSlab;
    for (int r = 0; r < nr; ++r) {
      store_row(c + (r0 + r) * ldc + c0, acc[r], n - c0);
    }
  });
}

// w [k, n] into wp [k, pad_slab(n)], the columns past n zero
inline void pad_columns(const float* w, int64_t k, int64_t n, float* wp) {
  const int64_t np = pad_slab(n);
  for (int64_t i = 0; i < k; ++i) {
    std::copy_n(w + i * n, n, wp + i * np);
    std::fill(wp + i * np + n, wp + (i + 1) * np, 0.0f);
  }
}

// The layer's weights rearranged once per pass: wkt[p, c] = W_k'[c, p], wpt[p, c] = W_p[c, p] ([D, Hp], columns
// from H to Hp zero), from w1 = [W_k', W_p] ([H, 2D]); wkt may be null (backward needs W_pᵀ alone)
inline void transpose_weights(const float* w1, int64_t h, int64_t d, float* wkt, float* wpt) {
  const int64_t hp = pad_slab(h);
  if (wkt != nullptr) std::fill(wkt, wkt + d * hp, 0.0f);
  std::fill(wpt, wpt + d * hp, 0.0f);
  for (int64_t c = 0; c < h; ++c) {
    for (int64_t p = 0; p < d; ++p) {
      if (wkt != nullptr) wkt[p * hp + c] = w1[c * 2 * d + p];
      wpt[p * hp + c] = w1[c * 2 * d + d + p];
    }
  }
}

// M_b = wkt + diag(q) wpt  ([D, Hp])
inline void sample_matrix(const float* __restrict wkt, const float* __restrict wpt, const float* __restrict q,
                          int64_t d, int64_t hp, float* __restrict m) {
  for (int64_t p = 0; p < d; ++p) {
    const float qp = q[p];
    for (int64_t c = 0; c < hp; ++c) m[p * hp + c] = wkt[p * hp + c] + qp * wpt[p * hp + c];
  }
}

// M_bᵀ ([H, Dp], columns from D to Dp zero) from w1 directly
inline void sample_matrix_t(const float* __restrict w1, const float* __restrict q, int64_t h, int64_t d,
                            float* __restrict mt) {
  const int64_t dp = pad_slab(d);
  for (int64_t c = 0; c < h; ++c) {
    const float* __restrict wk = w1 + c * 2 * d;
    const float* __restrict wp = wk + d;
    float* __restrict o = mt + c * dp;
    for (int64_t p = 0; p < d; ++p) o[p] = wk[p] + q[p] * wp[p];
    for (int64_t p = d; p < dp; ++p) o[p] = 0.0f;
  }
}

// Forward for one sample's rows: x_i = qpart + M_bᵀ k_i into x (rows h apart), the column sums and sums of squares
// of x added to sum and sq ([Hp] each). keys: the sample's key rows (krow[i], D floats each); m: M_b.
inline void forward(int64_t rows, const float* const* krow, const float* m, const float* __restrict qpart,
                    int64_t d, int64_t h, float* x, float* __restrict sum, float* __restrict sq) {
  const int64_t hp = pad_slab(h);
  const auto a = [&](int64_t r, int64_t k) { return krow[r][k]; };
  tiles(rows, h, d, a, m, hp, [&](int64_t r0, int n, int64_t s, vec (&acc)[kTile][2]) {
    const int64_t c0 = s * kSlab;
    if (c0 + kSlab <= h) {
      const vec q0 = loadv(qpart + c0), q1 = loadv(qpart + c0 + kLanes);
      vec s0 = loadv(sum + c0), s1 = loadv(sum + c0 + kLanes), t0 = loadv(sq + c0), t1 = loadv(sq + c0 + kLanes);
      for (int r = 0; r < n; ++r) {
        const vec x0 = acc[r][0] + q0, x1 = acc[r][1] + q1;
        float* xr = x + (r0 + r) * h + c0;
        storev(xr, x0);
        storev(xr + kLanes, x1);
        s0 += x0;
        s1 += x1;
        t0 = fmav(x0, x0, t0);
        t1 = fmav(x1, x1, t1);
      }
      storev(sum + c0, s0);
      storev(sum + c0 + kLanes, s1);
      storev(sq + c0, t0);
      storev(sq + c0 + kLanes, t1);
      return;
    }
    for (int r = 0; r < n; ++r) {  // the last, partial slab
      float v[kSlab];
      storev(v, acc[r][0]);
      storev(v + kLanes, acc[r][1]);
      for (int64_t j = 0; c0 + j < h; ++j) {
        const float xv = v[j] + qpart[c0 + j];
        x[(r0 + r) * h + c0 + j] = xv;
        sum[c0 + j] += xv;
        sq[c0 + j] += xv * xv;
      }
    }
  });
}

// Backward for one sample's rows, given dx (rows hp apart, columns from H to Hp zero): the keys' gradient rows
// gkrow[i] = M_b dx_i (D floats), and dM_b's share added to gwkt and gwpt ([D, Hp]: W_k'ᵀ's and W_pᵀ's gradients)
// and to gq ([D], the query's). mt: M_bᵀ; wpt: W_pᵀ; tmp: Dp floats.
inline void backward(int64_t rows, const float* const* krow, float* const* gkrow, const float* dx, const float* mt,
                     const float* __restrict wpt, const float* __restrict q, int64_t d, int64_t h, float* gwkt,
                     float* gwpt, float* __restrict gq) {
  const int64_t hp = pad_slab(h), dp = pad_slab(d);
  // dk_i = M_b dx_i: rows i, inner dimension c (H), columns p (Dp)
  const auto adx = [&](int64_t r, int64_t k) { return dx[r * hp + k]; };
  tiles(rows, d, h, adx, mt, dp, [&](int64_t r0, int n, int64_t s, vec (&acc)[kTile][2]) {
    const int64_t p0 = s * kSlab;
    for (int r = 0; r < n; ++r) {
      store_row(gkrow[r0 + r] + p0, acc[r], d - p0);
    }
  });
  // dM_b[p, c] = Σ_i k_i[p] dx_i[c]: rows p (D), inner dimension i, columns c (Hp)
  const auto ak = [&](int64_t r, int64_t k) { return krow[k][r]; };
  vec dq[kTile];
  tiles(d, h, rows, ak, dx, hp, [&](int64_t p0, int n, int64_t s, vec (&acc)[kTile][2]) {
    const int64_t c0 = s * kSlab;
    if (s == 0) {
      for (int r = 0; r < n; ++r) dq[r] = splat(0.0f);
    }
    for (int r = 0; r < n; ++r) {
      const int64_t o = (p0 + r) * hp + c0;
      const vec qv = splat(q[p0 + r]);
      storev(gwkt + o, loadv(gwkt + o) + acc[r][0]);
      storev(gwkt + o + kLanes, loadv(gwkt + o + kLanes) + acc[r][1]);
      storev(gwpt + o, fmav(qv, acc[r][0], loadv(gwpt + o)));
      storev(gwpt + o + kLanes, fmav(qv, acc[r][1], loadv(gwpt + o + kLanes)));
      dq[r] = fmav(loadv(wpt + o), acc[r][0], dq[r]);
      dq[r] = fmav(loadv(wpt + o + kLanes), acc[r][1], dq[r]);
    }
    if ((s + 1) * kSlab == hp) {
      for (int r = 0; r < n; ++r) gq[p0 + r] += hsum(dq[r]);
    }
  });
}

// the end of the run of rows of sample rows[i0], within [i0, end)
inline int64_t sample_end(const int64_t* rows, int64_t i0, int64_t end) {
  int64_t i1 = i0;
  while (i1 < end && rows[i1] == rows[i0]) ++i1;
  return i1;
}

// the first layer's pre-activations x_0 = qpart[b] + M_bᵀ k (unit_first_layer.h) into x [N, H], sample by sample in
// chunks of at most `chunk` rows, with each group's column sums and sums of squares added to part ([groups, 2H])
inline void forward_pass(const float* kp, const float* qp, const float* qpp, const int64_t* fp, const int64_t* rp,
                         const std::vector<int64_t>& bounds, const float* w1, int64_t d, int64_t h, int64_t chunk,
                         float* x, std::vector<double>& part) {
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1, hp = pad_slab(h);
  std::vector<float> wkt(static_cast<size_t>(d * hp)), wpt(static_cast<size_t>(d * hp));
  transpose_weights(w1, h, d, wkt.data(), wpt.data());
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> m(static_cast<size_t>(d * hp)), acc(static_cast<size_t>(2 * hp));
    std::vector<const float*> krow(chunk);
    for (int64_t g = g0; g < g1; ++g) {
      double* pp = part.data() + g * 2 * h;
      for (int64_t i0 = bounds[g], i1; i0 < bounds[g + 1]; i0 = i1) {
        i1 = sample_end(rp, i0, bounds[g + 1]);
        const int64_t b = rp[i0];
        sample_matrix(wkt.data(), wpt.data(), qp + b * d, d, hp, m.data());
        for (int64_t r0 = i0; r0 < i1; r0 += chunk) {
          const int64_t nb = std::min(i1, r0 + chunk) - r0;
          for (int64_t i = 0; i < nb; ++i) krow[i] = kp + fp[r0 + i] * d;
          std::fill(acc.begin(), acc.end(), 0.0f);
          forward(nb, krow.data(), m.data(), qpp + b * h, d, h, x + r0 * h, acc.data(),
                                    acc.data() + hp);
          for (int64_t j = 0; j < h; ++j) {
            pp[j] += acc[j];
            pp[h + j] += acc[hp + j];
          }
        }
      }
    }
  });
}

}  // namespace unit_first_layer
