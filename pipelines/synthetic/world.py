"""The static synthetic world: topics, categories and items (signals (a), (b)) and users (signals (c), (e)).

Everything here is drawn once per seed, before any behavior is simulated; formulas in `pipelines.synthetic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.synthetic.config import DAY, T0, SyntheticConfig

# stream tags of the random generators: default_rng([seed, tag, ...])
_ITEMS, _USERS, _CHUNK = 1, 2, 3


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


def _sparse_ids(rng: np.random.Generator, n: int, base: int, max_gap: int) -> np.ndarray:
    """n distinct non-contiguous int64 ids above `base`, in random order."""
    ids = base + np.cumsum(rng.integers(1, max_gap, size=n, dtype=np.int64))
    return rng.permutation(ids)


def _sample_in_ranges(
    rng: np.random.Generator, cdf: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int, n: int
) -> np.ndarray:
    """Draw an index in [lo, hi) proportionally to the masses whose inclusive cumulative sum is `cdf`."""
    lo = np.broadcast_to(np.asarray(lo, dtype=np.int64), (n,))
    hi = np.broadcast_to(np.asarray(hi, dtype=np.int64), (n,))
    start = np.where(lo > 0, cdf[np.maximum(lo - 1, 0)], 0.0)
    end = cdf[hi - 1]
    x = start + rng.random(n) * (end - start)
    return np.clip(np.searchsorted(cdf, x, side="right"), lo, hi - 1)


# --------------------------------------------------------------------------------------------------- item world


@dataclass(frozen=True)
class ItemWorld:
    """Items in internal order (sorted by topic, then category); raw ids are `item_ids[i]`."""

    item_ids: np.ndarray  # (N,) int64 raw ids
    cate_ids: np.ndarray  # (C,) int64 raw ids
    topic_ids: np.ndarray  # (T,) int64 raw ids
    item_cate: np.ndarray  # (N,) internal category of each item
    item_topic: np.ndarray  # (N,)
    cate_topic: np.ndarray  # (C,)
    latent: np.ndarray  # (N, d) z_i
    unit: np.ndarray  # (N, d) zhat_i
    mm_emb: np.ndarray  # (N, D) float32
    pop_prob: np.ndarray  # (N,) pi_i
    pop_score: np.ndarray  # (N,) standardized log-popularity
    item_cdf: np.ndarray  # (N,) cumsum of pi in internal order
    cate_lo: np.ndarray  # (C,) item range [lo, hi) of each category
    cate_hi: np.ndarray
    topic_lo: np.ndarray  # (T,) item range of each topic
    topic_hi: np.ndarray
    cate_mass: np.ndarray  # (C,) sum of pi over the category
    topic_cdf: np.ndarray  # (T,) cumsum of the topic masses


def build_items(cfg: SyntheticConfig, seed: int) -> ItemWorld:
    """Topics -> categories -> items, Zipf popularity, latent vectors and mm_emb (signals (a), (b))."""
    rng = _rng(seed, _ITEMS)
    T, C, N, d = cfg.n_topics, cfg.n_cates, cfg.n_items, cfg.latent_dim
    g = rng.standard_normal((T, d))
    s = cfg.topic_smooth
    centroid = sum(np.roll(g, k, axis=0) for k in range(-s, s + 1)) / math.sqrt(2 * s + 1)
    cate_topic = np.sort(np.concatenate([np.arange(T), rng.integers(0, T, size=C - T)]))
    cate_offset = rng.normal(0.0, cfg.cate_offset_std, size=(C, d))
    size_w = rng.lognormal(0.0, cfg.cate_size_sigma, size=C)
    item_cate = np.sort(np.concatenate([np.arange(C), rng.choice(C, size=N - C, p=size_w / size_w.sum())]))
    item_topic = cate_topic[item_cate]
    latent = centroid[item_topic] + cate_offset[item_cate] + rng.normal(0.0, cfg.item_noise_std, size=(N, d))
    unit = latent / np.linalg.norm(latent, axis=1, keepdims=True)
    rank = rng.permutation(N) + 1
    w = rank.astype(np.float64) ** (-cfg.zipf_alpha)
    pop_prob = w / w.sum()
    log_pop = np.log(pop_prob)
    pop_score = (log_pop - log_pop.mean()) / max(log_pop.std(), 1e-12)
    item_cdf = np.cumsum(pop_prob)
    cate_lo = np.searchsorted(item_cate, np.arange(C), side="left")
    cate_hi = np.searchsorted(item_cate, np.arange(C), side="right")
    topic_lo = np.searchsorted(item_topic, np.arange(T), side="left")
    topic_hi = np.searchsorted(item_topic, np.arange(T), side="right")
    cate_mass = np.add.reduceat(pop_prob, cate_lo)
    topic_cdf = np.cumsum(np.bincount(cate_topic, weights=cate_mass, minlength=T))
    proj = rng.standard_normal((d, cfg.mm_dim)) / math.sqrt(d)
    mm_emb = (latent @ proj + rng.normal(0.0, cfg.mm_noise_std, size=(N, cfg.mm_dim))).astype(np.float32)
    return ItemWorld(
        item_ids=_sparse_ids(rng, N, base=5_000_000_000, max_gap=1_000),
        cate_ids=_sparse_ids(rng, C, base=100_000, max_gap=100),
        topic_ids=_sparse_ids(rng, T, base=900, max_gap=10),
        item_cate=item_cate,
        item_topic=item_topic,
        cate_topic=cate_topic,
        latent=latent,
        unit=unit,
        mm_emb=mm_emb,
        pop_prob=pop_prob,
        pop_score=pop_score,
        item_cdf=item_cdf,
        cate_lo=cate_lo,
        cate_hi=cate_hi,
        topic_lo=topic_lo,
        topic_hi=topic_hi,
        cate_mass=cate_mass,
        topic_cdf=topic_cdf,
    )


# --------------------------------------------------------------------------------------------------- users


def sample_history_lengths(cfg: SyntheticConfig, n: int, rng: np.random.Generator | int) -> np.ndarray:
    """Per-user history lengths L_u (signal (e)): cold zeros, a lognormal body, a Pareto tail, whales at max_len."""
    rng = np.random.default_rng(rng)
    kind = rng.random(n)
    body = np.floor(np.exp(math.log(cfg.len_median) + cfg.len_sigma * rng.standard_normal(n)))
    tail = np.floor(cfg.tail_xm * (1.0 - rng.random(n)) ** (-1.0 / cfg.tail_alpha))
    lengths = np.where(kind < cfg.tail_frac, tail, np.maximum(body, 1.0))
    lengths = np.where(kind > 1.0 - cfg.p_cold, 0.0, lengths)
    lengths = np.minimum(lengths, cfg.max_len).astype(np.int64)
    whales = rng.permutation(n)[: min(cfg.n_whales, n)]
    lengths[whales] = cfg.max_len
    return lengths


@dataclass(frozen=True)
class UserWorld:
    """Per-user parameters in internal order; raw ids are `user_ids[u]`."""

    user_ids: np.ndarray  # (U,) int64 raw ids
    segment: np.ndarray  # (U,) internal segment
    segment_ids: np.ndarray  # (n_segments,) int64 raw ids
    bias: np.ndarray  # (U,) user_bias_u
    lengths: np.ndarray  # (U,) L_u
    interests: np.ndarray  # (U, K) internal category, -1 = none
    weights: np.ndarray  # (U, K) omega_u (0 where none)
    dormant: np.ndarray  # (U, K) bool
    cut: np.ndarray  # (U,) cut_u = first position without dormant interests
    end_ts: np.ndarray  # (U,) end_u
    duration: np.ndarray  # (U,) seconds
    n_impressions: np.ndarray  # (U,)

    def dormant_categories(self) -> np.ndarray:
        """(U, K) the dormant interest categories, -1 elsewhere."""
        return np.where(self.dormant, self.interests, -1)


def build_users(cfg: SyntheticConfig, items: ItemWorld, seed: int) -> UserWorld:
    """Interests (some dormant), biases, history lengths, time windows and impression counts (signals (c), (e))."""
    rng = _rng(seed, _USERS)
    n, K = cfg.n_users, cfg.max_interests
    lengths = sample_history_lengths(cfg, n, rng)
    k_u = np.clip(1 + rng.poisson(cfg.interests_mean - 1.0, size=n), 1, K)
    cate_w = items.cate_mass**cfg.interest_pop_temper
    interests = _sample_in_ranges(rng, np.cumsum(cate_w), 0, cfg.n_cates, n * K).reshape(n, K)
    valid = np.arange(K)[None, :] < k_u[:, None]
    for k in range(1, K):  # drop repeated categories (K is a handful of slots)
        dup = ((interests[:, :k] == interests[:, k : k + 1]) & valid[:, :k]).any(axis=1)
        valid[:, k] &= ~dup
    interests = np.where(valid, interests, -1)
    weights = rng.gamma(1.0, size=(n, K)) * valid
    weights /= weights.sum(axis=1, keepdims=True)
    dormant = (rng.random((n, K)) < cfg.p_dormant) & valid
    dormant[:, 0] = False
    cut = np.floor(rng.uniform(cfg.dormant_cut_lo, cfg.dormant_cut_hi, size=n) * lengths).astype(np.int64)
    segment = rng.integers(0, cfg.n_segments, size=n)
    seg_effect = rng.normal(0.0, cfg.segment_bias_std, size=cfg.n_segments)
    bias = seg_effect[segment] + rng.normal(0.0, cfg.user_bias_std, size=n)
    span = int(cfg.span_days * DAY)
    duration = np.floor(span * rng.uniform(cfg.duration_lo, 1.0, size=n)).astype(np.int64)
    end_ts = T0 + span - np.floor(rng.exponential(2.0 * DAY, size=n)).astype(np.int64)
    gain = np.minimum(((1.0 + lengths) / (1.0 + cfg.len_median)) ** cfg.imp_len_power, cfg.imp_len_gain_max)
    n_imp = cfg.imp_min + rng.poisson(cfg.imp_mean * gain)
    return UserWorld(
        user_ids=_sparse_ids(rng, n, base=10**12, max_gap=5_000),
        segment=segment,
        segment_ids=_sparse_ids(rng, cfg.n_segments, base=7_000, max_gap=50),
        bias=bias,
        lengths=lengths,
        interests=interests,
        weights=weights,
        dormant=dormant,
        cut=cut,
        end_ts=end_ts,
        duration=duration,
        n_impressions=n_imp.astype(np.int64),
    )
