// Rows summed by index: out[index[i]] += src[i] over i in order, into a zero [rows, D] block. The backward of every
// row gather (`index_select`, an embedding look-up) and the sparse update's sum of each distinct row's gradients
// (ctr/train/cpu_tables.py).
//
// PyTorch's CPU `index_add_` on dim 0 of a 2-D tensor goes through `scatter_add_` with an expanded index: a sort of
// the index, then a parallel reduction of the sorted runs. For the sizes of a training step that sort is most of the
// time: summing 88K look-ups of 16 floats into 14K distinct table rows took 4.4 ms there, 0.5 ms here; a DIN step at
// L = 50 ran four such sums (the table update and its activation unit's three gathers). Here one pass in index order:
// each row of `src` is read once and added to its destination, whose 16 to 128 floats stay in cache for repeats.
// In index order, so the result is the same on every run and thread count: each thread owns a range of destination
// rows and reads the whole index for the rows bound there, so each destination's terms are added in index order
// (tests/test_native_rows.py holds the result to PyTorch's, and equal across thread counts).
//
// `unique_inverse` finds the sparse update's distinct rows: the distinct values of an int64 index in order of first
// occurrence and each position's place among them, through an open-addressing hash table, or by value where the
// values lie in [0, 2N) (tables smaller than a step's look-ups: 0.46 -> 0.15 ms for 88K look-ups into 9,765 rows).
// `torch.unique` sorts the index for the same answer (sorted): 1.4 ms against 0.65 here for 110K look-ups of 37K
// distinct rows, 2 threads; the update sums each row's gradients in index order (`index_add_rows`), so the order of
// the distinct rows changes no value, only which row is written first.
//
// `lookup_rows` places a step's look-ups in the tables' flat buffers (with their bounds check), and
// `adagrad_rows` and `adam_rows` then apply the tables' optimizer step to those distinct rows in one pass each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kParallelFloats = 1 << 16;  // below this many source floats, one thread
constexpr int64_t kParallelAddFloats = 1 << 22;  // the same for `index_add_rows` (see there)

// (smallest, largest) of x[0..n) (n > 0)
inline std::pair<int64_t, int64_t> value_range(const int64_t* __restrict x, int64_t n) {
  int64_t lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  return {lo, hi};
}

inline void add_row(float* __restrict dst, const float* __restrict row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) dst[j] += row[j];
}

// one block of consecutive source rows: its rows (null: zeros, nothing added), the first index it binds, its count
struct Block {
  const float* src;
  int64_t first, count;
};

// out[index[i]] += (row i of the blocks, in order) into a zero [rows, d] block
at::Tensor add_blocks(const std::vector<Block>& blocks, const at::Tensor& index, int64_t rows, int64_t d,
                      const at::TensorOptions& opt) {
  const int64_t n = index.size(0);
  at::Tensor out = at::empty({rows, d}, opt);  // each part zeroes its own rows below
  const int64_t* ix = index.data_ptr<int64_t>();
  // every index checked before any row is added: the range, then the first bad one
  const auto [lo_ix, hi_ix] = n > 0 ? value_range(ix, n) : std::pair<int64_t, int64_t>{0, 0};
  for (int64_t i = 0; n > 0 && (lo_ix < 0 || hi_ix >= rows) && i < n; ++i) {
    TORCH_CHECK(ix[i] >= 0 && ix[i] < rows, "ctr_native index_add_rows: index ", ix[i], " at row ", i,
                " is outside the ", rows, " rows of the result");
  }
  float* o = out.data_ptr<float>();
  // each thread owns a range of destination rows and adds, in index order, the source rows bound there: every
  // destination's terms in the same order on any thread count. One thread below 4M source floats: every thread
  // reads the whole index and skips what is not its own, a branch it mispredicts half the time on a step's random
  // rows, so that two threads took longer than one there (88K rows of 16: 0.57 ms on two, 0.30 on one; 1M rows of
  // 32: 23.8 on two, 26.8 on one)
  const int64_t parts = n * d < kParallelAddFloats ? 1 : std::min<int64_t>(at::get_num_threads(), rows);
  const auto add_part = [&](int64_t lo, int64_t hi) {
    std::fill(o + lo * d, o + hi * d, 0.0f);
    for (const Block& b : blocks) {
      if (b.src == nullptr) continue;
      const int64_t* bx = ix + b.first;
      for (int64_t i = 0; i < b.count; ++i) {
        if (parts == 1 || (bx[i] >= lo && bx[i] < hi)) add_row(o + bx[i] * d, b.src + i * d, d);
      }
    }
  };
  if (parts == 1) {
    add_part(0, rows);
    return out;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) add_part(rows * p / parts, rows * (p + 1) / parts);
  });
  return out;
}

void check_index(const at::Tensor& index, int64_t n, int64_t rows) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 &&
                  index.is_contiguous() && index.size(0) == n,
              "ctr_native index_add_rows: index must be a contiguous int64 [N] CPU tensor, one per source row");
  TORCH_CHECK(rows >= 0, "ctr_native index_add_rows: rows must be >= 0, got ", rows);
}

at::Tensor index_add_rows(const at::Tensor& src, const at::Tensor& index, int64_t rows) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kFloat && src.dim() == 2 && src.is_contiguous(),
              "ctr_native index_add_rows: src must be a contiguous float32 [N, D] CPU tensor");
  check_index(index, src.size(0), rows);
  return add_blocks({{src.data_ptr<float>(), 0, src.size(0)}}, index, rows, src.size(1), src.options());
}

// `index_add_rows` over the rows of several blocks in order (block k: `sizes[k]` rows of `d`; an undefined block
// adds nothing): the sparse update's gradients as its look-up's outputs left them, without concatenating them first
at::Tensor index_add_blocks(const std::vector<std::optional<at::Tensor>>& srcs, at::IntArrayRef sizes,
                            const at::Tensor& index, int64_t rows, int64_t d) {
  TORCH_CHECK(srcs.size() == sizes.size(), "ctr_native index_add_blocks: ", srcs.size(), " blocks, ", sizes.size(),
              " sizes");
  std::vector<Block> blocks;
  int64_t first = 0;
  for (size_t k = 0; k < srcs.size(); ++k) {
    const float* p = nullptr;
    if (srcs[k].has_value() && srcs[k]->defined()) {
      const at::Tensor& t = *srcs[k];
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                      t.numel() == sizes[k] * d,
                  "ctr_native index_add_blocks: block ", k, " must be a contiguous float32 CPU tensor of ", sizes[k],
                  " x ", d, " values, got ", t.sizes());
      p = t.data_ptr<float>();
    }
    TORCH_CHECK(sizes[k] >= 0, "ctr_native index_add_blocks: block ", k, " has ", sizes[k], " rows");
    blocks.push_back({p, first, sizes[k]});
    first += sizes[k];
  }
  check_index(index, first, rows);
  return add_blocks(blocks, index, rows, d, at::TensorOptions().dtype(at::kFloat));
}

// (distinct values of x in order of first occurrence [U], inverse [N]: x[i] == unique[inverse[i]])
std::vector<at::Tensor> unique_inverse(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong && x.dim() == 1 && x.is_contiguous(),
              "ctr_native unique_inverse: x must be a contiguous int64 [N] CPU tensor");
  const int64_t n = x.size(0);
  at::Tensor unique = at::empty({n}, x.options()), inverse = at::empty({n}, x.options());
  const int64_t* xs = x.data_ptr<int64_t>();
  int64_t *u = unique.data_ptr<int64_t>(), *inv = inverse.data_ptr<int64_t>();
  int64_t count = 0;
  const auto [lo, hi] = n > 0 ? value_range(xs, n) : std::pair<int64_t, int64_t>{0, -1};
  if (n > 0 && lo >= 0 && hi < 2 * n) {
    // values in a range no wider than twice their count (a step's rows of tables smaller than its look-ups): a place
    // per value of the range, indexed directly, instead of hashing; the same places, in order of first occurrence
    std::vector<int64_t> place(static_cast<size_t>(hi + 1), -1);
    for (int64_t i = 0; i < n; ++i) {
      int64_t& p = place[static_cast<size_t>(xs[i])];
      if (p < 0) {
        p = count;
        u[count++] = xs[i];
      }
      inv[i] = p;
    }
    return {unique.narrow(0, 0, count).clone(), inverse};
  }
  int bits = 4;
  while ((int64_t{1} << bits) < 2 * n) ++bits;  // at most half full
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  std::vector<int64_t> slot(static_cast<size_t>(mask + 1), -1);  // -1 empty, else the value's place in `unique`
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = xs[i];
    // Fibonacci hashing: the product's top bits, so that runs of nearby rows spread over the table
    uint64_t h = (static_cast<uint64_t>(v) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
    while (slot[h] >= 0 && u[slot[h]] != v) h = (h + 1) & mask;
    if (slot[h] < 0) {
      slot[h] = count;
      u[count++] = v;
    }
    inv[i] = slot[h];
  }
  return {unique.narrow(0, 0, count).clone(), inverse};
}

// Exact Adagrad on the update's distinct rows, in place: for each u, with g = grad[u] (the row's summed gradient),
//   m = momentum[m_rows[u]] + g g,   weights[rows[u]] += (−lr g) / (√m + eps)
// in one pass over the rows, where the eager form (ctr/train/cpu_tables.py) runs eight (two gathers, two scatters, the
// square, the root, the sum and the quotient, each a block of its own). The same operations in the same order per
// value, m + g g as one fused multiply-add and every operation correctly rounded; PyTorch's float32 `sqrt` on the CPU
// is not always, so a weight can differ from the eager form's in its last place (tests/test_cpu_tables.py). The
// result does not depend on the thread count. `rows` and `m_rows` must each be distinct (the rows are updated in
// parallel), as the update's distinct rows are.
// the checks shared by the sparse optimizers' steps: float32 2-D state blocks as wide as grad, int64 row lists
// [U] whose rows lie inside the blocks
void check_rows_step(const char* op, std::initializer_list<const at::Tensor*> states, const at::Tensor& rows,
                     const at::Tensor& m_rows, const at::Tensor& grad) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.dim() == 2 && grad.is_contiguous(),
              "ctr_native ", op, ": grad must be a contiguous float32 [U, D] CPU tensor, got ", grad.sizes());
  const int64_t u = grad.size(0), d = grad.size(1);
  for (const at::Tensor* t : states) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous() &&
                    t->size(1) == d,
                "ctr_native ", op, ": the weights, the optimizer's states and grad must be contiguous float32 2-D "
                "CPU tensors of the same width, got ", t->sizes(), " and grad ", grad.sizes());
  }
  for (const auto* t : {&rows, &m_rows}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() &&
                    t->size(0) == u,
                "ctr_native ", op, ": rows and m_rows must be contiguous int64 [U] CPU tensors, one per grad row");
  }
  const int64_t *r = rows.data_ptr<int64_t>(), *mr = m_rows.data_ptr<int64_t>();
  const int64_t w_rows = (*states.begin())->size(0);
  for (const at::Tensor* t : states) {
    const bool weights = t == *states.begin();
    for (int64_t i = 0; i < u; ++i) {
      const int64_t row = weights ? r[i] : mr[i];
      TORCH_CHECK(row >= 0 && row < t->size(0), "ctr_native ", op, ": row ", i, " (weight row ", r[i],
                  ", state row ", mr[i], ") is outside the tables (", w_rows, " weight rows, ", t->size(0),
                  " state rows)");
    }
  }
}

// Exact Adagrad on the update's distinct rows, in place: for each u, with g = grad[u] (the row's summed gradient),
//   m = momentum[m_rows[u]] + g g,   weights[rows[u]] += (−lr g) / (√m + eps)
// in one pass over the rows, where the eager form (ctr/train/cpu_tables.py) runs eight (two gathers, two scatters, the
// square, the root, the sum and the quotient, each a block of its own). The same operations in the same order per
// value, m + g g as one fused multiply-add and every operation correctly rounded; PyTorch's float32 `sqrt` on the CPU
// is not always, so a weight can differ from the eager form's in its last place (tests/test_cpu_tables.py). The
// result does not depend on the thread count. `rows` and `m_rows` must each be distinct (the rows are updated in
// parallel), as the update's distinct rows are.
void adagrad_rows(at::Tensor weights, at::Tensor momentum, const at::Tensor& rows, const at::Tensor& m_rows,
                  const at::Tensor& grad, double lr, double eps) {
  check_rows_step("adagrad_rows", {&weights, &momentum}, rows, m_rows, grad);
  const int64_t u = grad.size(0), d = grad.size(1);
  const int64_t *r = rows.data_ptr<int64_t>(), *mr = m_rows.data_ptr<int64_t>();
  float *w = weights.data_ptr<float>(), *m = momentum.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float neg_lr = static_cast<float>(-lr), e = static_cast<float>(eps);
  at::parallel_for(0, u, std::max<int64_t>(1, kParallelFloats / std::max<int64_t>(d, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* __restrict wr = w + r[i] * d;
      float* __restrict mrow = m + mr[i] * d;
      const float* __restrict gr = g + i * d;
      for (int64_t j = 0; j < d; ++j) {
        const float mv = std::fma(gr[j], gr[j], mrow[j]);
        mrow[j] = mv;
        wr[j] = wr[j] + (neg_lr * gr[j]) / (std::sqrt(mv) + e);
      }
    }
  });
}

struct AdamStep {
  float b1, b2, c1, c2, rbc1, rsbc2, eps, neg_lr, decay;
};

// one row of Adam's step, restrict parameters and the constants by value so that it vectorizes (with the decay
// branch outside the loop: 0 · w is not 0 for an infinite weight)
template <bool kDecay>
inline void adam_row(float* __restrict wr, float* __restrict mrow, float* __restrict vrow, const float* __restrict gr,
                     int64_t d, AdamStep k) {
  for (int64_t j = 0; j < d; ++j) {
    const float mv = std::fma(k.c1, gr[j], mrow[j] * k.b1);
    const float vv = std::fma(k.c2 * gr[j], gr[j], vrow[j] * k.b2);
    mrow[j] = mv;
    vrow[j] = vv;
    float dir = (mv * k.rbc1) / std::fma(std::sqrt(vv), k.rsbc2, k.eps);
    if (kDecay) dir = std::fma(k.decay, wr[j], dir);
    wr[j] = std::fma(k.neg_lr, dir, wr[j]);
  }
}

// FBGEMM's (GPU) Adam on the update's distinct rows, in place, at the table group's step `step` (already counted):
//   m = β1 m + (1 − β1) g,   v = β2 v + (1 − β2) g g,
//   weights[rows[u]] −= lr ((m / (1 − β1^step)) / (√(v / (1 − β2^step)) + eps) + weight_decay w)
// with m, v the rows m_rows[u] of `m1` and `m2`, in one pass over the rows where the eager form (`_adam_eager` in
// ctr/train/cpu_tables.py) runs fourteen operators, each a pass of its own. Per value the eager operators' order and
// roundings: β1 m, then (1 − β1) g added in one fused multiply-add (PyTorch's `add_` with alpha); β2 v, then
// ((1 − β2) g) g added in one (its `addcmul_`); the decay and the step as fused multiply-adds (`add_` and `sub_` with
// alpha). The moments come out bit for bit the eager ones. The step direction is m / bc1 / (√(v / bc2) + eps) computed
// as (m · (1 / bc1)) / (√v · (1 / √bc2) + eps): one division and one root per value, not three divisions and a root
// (the divider, which the root shares, bounded the pass: 0.53 -> 0.32 ms for 6,000 rows of 16 on one thread), so a
// weight can differ from the eager form's in its last places, as it could already because `sqrt` here is correctly
// rounded and PyTorch's float32 one on the CPU is not always (tests/test_cpu_tables.py). The result does not
// depend on the thread count; `rows` and `m_rows` must each be distinct, as for `adagrad_rows`.
void adam_rows(at::Tensor weights, at::Tensor m1, at::Tensor m2, const at::Tensor& rows, const at::Tensor& m_rows,
               const at::Tensor& grad, double lr, double eps, double beta1, double beta2, double weight_decay,
               int64_t step) {
  check_rows_step("adam_rows", {&weights, &m1, &m2}, rows, m_rows, grad);
  TORCH_CHECK(step >= 1, "ctr_native adam_rows: step must be >= 1 (the step being taken), got ", step);
  const int64_t u = grad.size(0), d = grad.size(1);
  const int64_t *r = rows.data_ptr<int64_t>(), *mr = m_rows.data_ptr<int64_t>();
  float *w = weights.data_ptr<float>(), *mp = m1.data_ptr<float>(), *vp = m2.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float c1 = static_cast<float>(1.0 - beta1), c2 = static_cast<float>(1.0 - beta2);
  const float rbc1 = static_cast<float>(1.0 / (1.0 - std::pow(beta1, static_cast<double>(step))));
  const float rsbc2 = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  const AdamStep st{b1, b2, c1, c2, rbc1, rsbc2, static_cast<float>(eps), static_cast<float>(-lr),
                    static_cast<float>(weight_decay)};
  const bool decays = weight_decay != 0.0;
  at::parallel_for(0, u, std::max<int64_t>(1, kParallelFloats / std::max<int64_t>(d, 1)), [&](int64_t i0, int64_t i1) {
    const AdamStep k = st;  // by value: the row loops must not reload it through the closure (it kept them scalar)
    for (int64_t i = i0; i < i1; ++i) {
      if (decays) {
        adam_row<true>(w + r[i] * d, mp + mr[i] * d, vp + mr[i] * d, g + i * d, d, k);
      } else {
        adam_row<false>(w + r[i] * d, mp + mr[i] * d, vp + mr[i] * d, g + i * d, d, k);
      }
    }
  });
}

// one feature's look-ups: their places, and how many lie outside [0, lim); branch-free, so that it vectorizes
inline int64_t place_feature(const int64_t* __restrict ix, int64_t n, int64_t lim, int64_t dw, int64_t dm,
                             int64_t* __restrict w, int64_t* __restrict m) {
  int64_t outside = 0;
  for (int64_t i = 0; i < n; ++i) {
    outside += static_cast<int64_t>(ix[i] < 0) | static_cast<int64_t>(ix[i] >= lim);
    w[i] = ix[i] + dw;
    m[i] = ix[i] + dm;
  }
  return outside;
}

// Where each look-up of a table-batched embedding lives in its flat weight and momentum buffers (cpu_tables._Rows):
// look-up i of feature f (bounds[f] <= i < bounds[f + 1]) reads row indices[i] of that feature's table, so
// weight[i] = indices[i] + w_base[f] and momentum[i] = indices[i] + m_base[f]. One pass, where the eager form
// repeated a [F, 3] table to [N, 3] and ran five whole-vector operators (0.6 to 0.7 ms a step at 88K look-ups).
// Returns [weight [N], momentum [N], bad [1]]: bad is the first look-up whose index is outside [0, table_rows[f])
// (-1 when none; nothing else is read from the buffers), for the caller's error message.
std::vector<at::Tensor> lookup_rows(const at::Tensor& indices, const at::Tensor& bounds, const at::Tensor& table_rows,
                                    const at::Tensor& w_base, const at::Tensor& m_base) {
  for (const auto* t : {&indices, &bounds, &table_rows, &w_base, &m_base}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "ctr_native lookup_rows: every argument must be a contiguous int64 vector on the CPU");
  }
  const int64_t f = table_rows.size(0), n = indices.size(0);
  TORCH_CHECK(bounds.size(0) == f + 1 && w_base.size(0) == f && m_base.size(0) == f,
              "ctr_native lookup_rows: bounds must have one more entry than the features' table_rows, w_base, m_base");
  const int64_t *b = bounds.data_ptr<int64_t>(), *ix = indices.data_ptr<int64_t>();
  TORCH_CHECK(b[0] == 0 && b[f] == n, "ctr_native lookup_rows: bounds must run from 0 to the ", n, " look-ups");
  for (int64_t k = 0; k < f; ++k) {
    TORCH_CHECK(b[k] <= b[k + 1], "ctr_native lookup_rows: bounds must not decrease (feature ", k, ")");
  }
  at::Tensor weight = at::empty({n}, indices.options()), momentum = at::empty({n}, indices.options());
  int64_t bad = -1;
  int64_t *w = weight.data_ptr<int64_t>(), *m = momentum.data_ptr<int64_t>();
  const int64_t *rows = table_rows.data_ptr<int64_t>(), *wb = w_base.data_ptr<int64_t>(),
                *mb = m_base.data_ptr<int64_t>();
  for (int64_t k = 0; k < f && bad < 0; ++k) {
    const int64_t lim = rows[k];
    if (place_feature(ix + b[k], b[k + 1] - b[k], lim, wb[k], mb[k], w + b[k], m + b[k]) > 0) {
      for (int64_t i = b[k]; i < b[k + 1]; ++i) {
        if (ix[i] < 0 || ix[i] >= lim) {
          bad = i;
          break;
        }
      }
    }
  }
  return {weight, momentum, at::full({1}, bad, indices.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("lookup_rows(Tensor indices, Tensor bounds, Tensor table_rows, Tensor w_base, Tensor m_base) -> Tensor[]");
  m.def("index_add_rows(Tensor src, Tensor index, int rows) -> Tensor");
  m.def("index_add_blocks(Tensor?[] srcs, int[] sizes, Tensor index, int rows, int d) -> Tensor");
  m.def("unique_inverse(Tensor x) -> Tensor[]");
  m.def(
      "adagrad_rows(Tensor(a!) weights, Tensor(b!) momentum, Tensor rows, Tensor m_rows, Tensor grad, float lr, "
      "float eps) -> ()");
  m.def(
      "adam_rows(Tensor(a!) weights, Tensor(b!) m1, Tensor(c!) m2, Tensor rows, Tensor m_rows, Tensor grad, float lr, "
      "float eps, float beta1, float beta2, float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) {
  m.impl("index_add_rows", &index_add_rows);
  m.impl("index_add_blocks", &index_add_blocks);
  m.impl("unique_inverse", &unique_inverse);
  m.impl("lookup_rows", &lookup_rows);
  m.impl("adagrad_rows", &adagrad_rows);
  m.impl("adam_rows", &adam_rows);
}
