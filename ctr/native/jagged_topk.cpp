// The GSU's top-K over a jagged prefix (kernels.gsu_topk's selection, kernels/reference/gsu_topk.py): for sample b
// and column h of scores [N, H], the K best of rows [offsets[b], offsets[b + 1]) by score descending, the larger
// position (the more recent behavior) first among equal scores; -inf and NaN are never selected; slots beyond the
// candidates hold position -1 and score 0.
//
// The PyTorch forms pad the batch to its longest sample and take a top-K (B x the longest history: one 10K-long
// user among 512 makes it 5M scores) or, when that padding would more than quadruple the work, stably sort every
// behavior of the batch by (sample, score) through a dozen gathers and scatters of [N] tensors. Here each sample's
// candidates are partitioned around the K-th (nth_element, linear on average), or, for a sample more than four
// times K long, kept in a heap of the K best so far (each behavior compared with the worst of them), and only the K
// are sorted: one pass over the scores. The positions and scores are the PyTorch forms' exactly (a selection, no arithmetic);
// tests/test_native.py holds them equal, ties and NaN included.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kTopKChunksPerThread = 8;
constexpr int64_t kHeapFrom = 4;  // samples longer than kHeapFrom x K keep a heap of K instead of all candidates

struct Cand {
  float v;    // the score (never -inf or NaN here)
  int64_t i;  // the position within the sample
};

// a before b: a higher score, then (equal scores, -0.0 == 0.0 included) the later position
inline bool better(const Cand& a, const Cand& b) { return a.v > b.v || (a.v == b.v && a.i > b.i); }

std::tuple<at::Tensor, at::Tensor> jagged_topk(const at::Tensor& scores, const at::Tensor& offsets, int64_t k) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2 &&
                  scores.is_contiguous(),
              "ctr_native jagged_topk: scores must be a contiguous float32 [N, H] CPU tensor");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.is_contiguous() && offsets.size(0) >= 1,
              "ctr_native jagged_topk: offsets must be a contiguous int64 [B + 1] CPU tensor");
  TORCH_CHECK(k >= 0, "ctr_native jagged_topk: k must be >= 0, got ", k);
  const int64_t b = offsets.size(0) - 1, h = scores.size(1);
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[b] == scores.size(0), "ctr_native jagged_topk: offsets must run from 0 to the rows (",
              scores.size(0), "), got ", o[0], " to ", o[b]);
  at::Tensor pos = at::full({b, h, k}, -1, offsets.options());
  at::Tensor val = at::zeros({b, h, k}, scores.options());
  if (b == 0 || k == 0 || h == 0) return {pos, val};
  const float* s = scores.data_ptr<float>();
  int64_t* pos_p = pos.data_ptr<int64_t>();
  float* val_p = val.data_ptr<float>();
  const int64_t n = o[b];
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(b, at::get_num_threads() * kTopKChunksPerThread));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // the candidates as (score, position) pairs side by side: the partition and the sort compare values in one
    // contiguous buffer instead of loading strided scores through positions
    std::vector<Cand> cand;
    for (int64_t c = c0; c < c1; ++c) {
      // chunk c: the samples whose first behavior lies in [c n / chunks, (c + 1) n / chunks) (about equal behaviors)
      const int64_t lo = c * n / chunks, hi = (c + 1) * n / chunks;
      const int64_t s0 = c == 0 ? 0 : std::lower_bound(o, o + b, lo) - o;
      const int64_t s1 = c + 1 == chunks ? b : std::lower_bound(o, o + b, hi) - o;
      for (int64_t smp = s0; smp < s1; ++smp) {
        const int64_t start = o[smp], len = o[smp + 1] - start;
        for (int64_t col = 0; col < h; ++col) {
          cand.clear();
          const float* sc = s + start * h + col;
          if (len <= kHeapFrom * k) {
            for (int64_t i = 0; i < len; ++i) {
              const float v = sc[i * h];
              if (v > -INFINITY) cand.push_back({v, i});  // false for -inf and NaN
            }
            if (static_cast<int64_t>(cand.size()) > k) {
              std::nth_element(cand.begin(), cand.begin() + k, cand.end(), better);
              cand.resize(k);
            }
          } else {
            // a long sample: the K best so far in a heap whose front is the worst of them; a behavior is compared
            // with that front and enters only if better (about K ln(len / K) entries, not len)
            for (int64_t i = 0; i < len; ++i) {
              const float v = sc[i * h];
              if (!(v > -INFINITY)) continue;
              if (static_cast<int64_t>(cand.size()) < k) {
                cand.push_back({v, i});
                std::push_heap(cand.begin(), cand.end(), better);
              } else if (better({v, i}, cand.front())) {
                std::pop_heap(cand.begin(), cand.end(), better);
                cand.back() = {v, i};
                std::push_heap(cand.begin(), cand.end(), better);
              }
            }
          }
          const int64_t keep = static_cast<int64_t>(cand.size());
          std::sort(cand.begin(), cand.end(), better);
          int64_t* pp = pos_p + (smp * h + col) * k;
          float* vp = val_p + (smp * h + col) * k;
          for (int64_t j = 0; j < keep; ++j) {
            pp[j] = cand[j].i;
            vp[j] = cand[j].v;
          }
        }
      }
    }
  });
  return {pos, val};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctr_native, m) {
  m.def("jagged_topk(Tensor scores, Tensor offsets, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctr_native, CPU, m) { m.impl("jagged_topk", &jagged_topk); }
