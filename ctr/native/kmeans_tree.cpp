// TWIN-V2's hierarchical k-means of one history (pipelines/cluster.py's `cluster_history`, its reference): a node of
// more than max_size rows is split by Lloyd's k-means (k-means++ start, k = min(branching, ceil(n / max_size)), at
// least 2) until every cluster holds at most max_size rows; rows k-means cannot separate (identical vectors) are cut
// into consecutive chunks of max_size; labels are numbered by first appearance.
//
// The reference spends its time in NumPy's per-call overhead, not in arithmetic: a 1,000-behavior block is about
// 45 k-means calls of 20 to 250 rows, each ten iterations of half a dozen small array operations (the demo world's
// clustering: 28,000 calls and 14 s per sequence file). Here the same steps run in one call per block: the same
// random draws (`unit`, the reference's `_unit`), the same distance formula |x|^2 - 2 x.c + |c|^2 in float64, the same
// tie rules (the first center among equal distances, the first row whose running sum reaches a k-means++ draw), so
// the labels equal the reference's wherever float rounding of a dot product cannot flip a comparison
// (tests/test_cluster.py compares them).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// the reference's `_unit(seed, j)`: SplitMix64 of seed * golden + (j + 1) * c, the top 53 bits as a double in [0, 1)
inline double unit(int64_t seed, int64_t j) {
  uint64_t z = static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(j + 1) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// <a, b> and |a - b|^2 over n doubles in sixteen partial sums: four vector registers of independent multiply-adds
// (one accumulator, or one register of four, would wait on each add's latency)
constexpr int kLanes = 16;

inline double combine(const double* lane) {
  double acc = 0.0;
  for (int k = 0; k < kLanes / 2; ++k) acc += lane[k] + lane[k + kLanes / 2];
  return acc;
}

inline double dot(const double* __restrict a, const double* __restrict b, int64_t n) {
  double lane[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int k = 0; k < kLanes; ++k) lane[k] += a[e + k] * b[e + k];
  }
  double acc = combine(lane);
  for (; e < n; ++e) acc += a[e] * b[e];
  return acc;
}

inline double sq_dist(const double* __restrict a, const double* __restrict b, int64_t n) {
  double lane[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double t = a[e + k] - b[e + k];
      lane[k] += t * t;
    }
  }
  double acc = combine(lane);
  for (; e < n; ++e) acc += (a[e] - b[e]) * (a[e] - b[e]);
  return acc;
}

// Lloyd's k-means of rows x [n, d] (n >= 1) from a k-means++ start: labels [n] in 0..k-1 (the reference's `kmeans`)
void kmeans(const double* x, int64_t n, int64_t d, int64_t k, int64_t seed, int64_t iters, std::vector<int64_t>& labels,
            std::vector<double>& centers, std::vector<double>& scratch) {
  centers.assign(k * d, 0.0);
  scratch.assign(2 * n, 0.0);
  double* d2 = scratch.data();
  double* cum = d2 + n;
  auto pick_row = [&](double u) { return std::min<int64_t>(static_cast<int64_t>(u * static_cast<double>(n)), n - 1); };
  const int64_t first = pick_row(unit(seed, 0));
  std::copy(x + first * d, x + (first + 1) * d, centers.begin());
  for (int64_t i = 0; i < n; ++i) d2[i] = sq_dist(x + i * d, centers.data(), d);
  for (int64_t j = 1; j < k; ++j) {  // the next center with probability proportional to the squared distance
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) cum[i] = total += d2[i];
    const double u = unit(seed, j);
    int64_t pick;
    if (total <= 0.0) {
      pick = pick_row(u);
    } else {
      pick = std::lower_bound(cum, cum + n, u * total) - cum;  // NumPy's searchsorted, side='left'
      pick = std::min<int64_t>(pick, n - 1);
    }
    std::copy(x + pick * d, x + (pick + 1) * d, centers.begin() + j * d);
    for (int64_t i = 0; i < n; ++i) d2[i] = std::min(d2[i], sq_dist(x + i * d, centers.data() + j * d, d));
  }
  labels.assign(n, 0);
  std::vector<double> xx(n), cc(k), sums(k * d);
  std::vector<int64_t> counts(k), fresh(n);
  for (int64_t i = 0; i < n; ++i) xx[i] = dot(x + i * d, x + i * d, d);
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t j = 0; j < k; ++j) cc[j] = dot(centers.data() + j * d, centers.data() + j * d, d);
    bool same = true;
    for (int64_t i = 0; i < n; ++i) {
      const double* xi = x + i * d;
      int64_t best = 0;
      double best_v = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const double v = (xx[i] - 2.0 * dot(xi, centers.data() + j * d, d)) + cc[j];
        if (j == 0 || v < best_v) best = j, best_v = v;  // the first of equal distances, as argmin
      }
      fresh[i] = best;
      same = same && best == labels[i];
    }
    if (same && it > 0) break;
    labels.swap(fresh);
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      double* s = sums.data() + labels[i] * d;
      const double* xi = x + i * d;
      for (int64_t e = 0; e < d; ++e) s[e] += xi[e];
      ++counts[labels[i]];
    }
    for (int64_t j = 0; j < k; ++j) {
      if (counts[j] == 0) continue;  // an empty cluster keeps its centroid
      for (int64_t e = 0; e < d; ++e) centers[j * d + e] = sums[j * d + e] / static_cast<double>(counts[j]);
    }
  }
}

at::Tensor kmeans_tree(const at::Tensor& x, int64_t max_size, int64_t seed, int64_t iters, int64_t branching) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kDouble && x.dim() == 2 && x.is_contiguous(),
              "ctr_native kmeans_tree: x must be a contiguous float64 [n, D] CPU tensor");
  TORCH_CHECK(max_size >= 1, "ctr_native kmeans_tree: max_size must be >= 1, got ", max_size);
  TORCH_CHECK(branching >= 2, "ctr_native kmeans_tree: branching must be >= 2, got ", branching);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::empty({n}, x.options().dtype(at::kLong));
  int64_t* labels = out.data_ptr<int64_t>();
  const double* xp = x.data_ptr<double>();
  std::fill(labels, labels + n, -1);
  int64_t next_label = 0;
  std::vector<std::vector<int64_t>> stack;
  stack.emplace_back(n);
  for (int64_t i = 0; i < n; ++i) stack.back()[i] = i;
  std::vector<double> rows, centers, scratch;
  std::vector<int64_t> sub, count, start;
  while (!stack.empty()) {
    std::vector<int64_t> idx = std::move(stack.back());
    stack.pop_back();
    const int64_t m = static_cast<int64_t>(idx.size());
    if (m <= max_size) {
      for (int64_t i : idx) labels[i] = next_label;
      ++next_label;
      continue;
    }
    const int64_t k = std::max<int64_t>(2, std::min<int64_t>(branching, (m + max_size - 1) / max_size));
    rows.resize(m * d);
    for (int64_t r = 0; r < m; ++r) std::copy(xp + idx[r] * d, xp + (idx[r] + 1) * d, rows.begin() + r * d);
    kmeans(rows.data(), m, d, k, seed + next_label, iters, sub, centers, scratch);
    count.assign(k, 0);
    for (int64_t r = 0; r < m; ++r) ++count[sub[r]];
    const int64_t parts = static_cast<int64_t>(std::count_if(count.begin(), count.end(), [](int64_t c) { return c > 0; }));
    std::vector<std::vector<int64_t>> children;
    if (parts == 1) {  // identical vectors: k-means cannot split them, cut into chunks of max_size
      for (int64_t s = 0; s < m; s += max_size) children.emplace_back(idx.begin() + s, idx.begin() + std::min(m, s + max_size));
    } else {
      std::vector<int64_t> slot(k, -1);
      for (int64_t j = 0; j < k; ++j) {
        if (count[j] > 0) slot[j] = static_cast<int64_t>(children.size()), children.emplace_back();
      }
      for (int64_t r = 0; r < m; ++r) children[slot[sub[r]]].push_back(idx[r]);  // each part in row order
    }
    for (auto it = children.rbegin(); it != children.rend(); ++it) stack.push_back(std::move(*it));  // part 0 next
  }
  // relabel by first appearance (oldest row first)
  std::vector<int64_t> renamed(next_label, -1);
  int64_t seen = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (renamed[labels[i]] < 0) renamed[labels[i]] = seen++;
    labels[i] = renamed[labels[i]];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("kmeans_tree(Tensor x, int max_size, int seed, int iters, int branching) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) { m.impl("kmeans_tree", &kmeans_tree); }
