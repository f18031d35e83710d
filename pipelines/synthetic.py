"""The synthetic lifelong world: a Taobao-like raw log with known ground truth (`ctr generate`).

`generate(preset, seed, out_dir)` writes a raw directory in the contract of `features.schema`::

    items.parquet            item_id, cate_id, topic_id int64, mm_emb fixed_size_list<float32>[D]
    behaviors/part-*.parquet user_id, item_id, ts int64, btype int8      (sorted by user, then ts)
    impressions/part-*.parquet
                             user_id, item_id, ts int64, label int8, user_segment int64, p_true float64
    source.json              generator, preset, seed, resolved parameters, row counts, summary

Everything is drawn from `numpy.random.Generator` streams keyed by `(seed, purpose[, chunk])`, so the same seed and
parameters give the same tables; users are simulated in chunks of at most `chunk_behaviors` behaviors (one part file
per chunk) with vectorized numpy only (no Python loop over behaviors or impressions).

Notation: T topics, C categories, N items, d = `latent_dim`, D = `mm_dim`, sigmoid(x) = 1 / (1 + exp(-x)).

(a) Hierarchical item space with a Zipf long tail.
    Every category c belongs to one topic tau(c) (each topic has >= 1 category); every item i to one category
    c(i) (each category has >= 1 item; category sizes ~ lognormal(0, `cate_size_sigma`)).
    Popularity: r = a random permutation of 1..N, pi_i = r_i^(-alpha) / sum_j r_j^(-alpha), alpha = `zipf_alpha`.
    pop_i = (log pi_i - mean_j log pi_j) / std_j log pi_j   (standardized log-popularity).

(b) Latent vectors and multimodal embeddings.
    Topic centroids lie on a ring: mu_t = (2s+1)^(-1/2) sum_{k=-s..s} g_{(t+k) mod T}, g_t ~ N(0, I_d),
    s = `topic_smooth` (neighbouring topics are similar, so a drifting intent moves between related topics).
    z_i = mu_{tau(c(i))} + o_{c(i)} + e_i,   o_c ~ N(0, `cate_offset_std`^2 I_d),  e_i ~ N(0, `item_noise_std`^2 I_d).
    zhat_i = z_i / ||z_i||.
    mm_emb_i = z_i P + n_i,   P ~ N(0, 1/d)^(d x D) (one fixed random projection),  n_i ~ N(0, `mm_noise_std`^2 I_D),
    stored as float32: content (mm_emb) generalizes to rare items because it is a noisy view of z_i.

(c) Users with long-term interests, some dormant.
    K_u = clip(1 + Poisson(`interests_mean` - 1), 1, `max_interests`) interest categories c_{u,k}, drawn with
    probability proportional to (sum of pi over the category)^`interest_pop_temper` (repeats dropped, so slightly
    fewer are possible); weights omega_u ~ Dirichlet(1, ..., 1) over the kept slots. Interest k >= 1 is dormant with
    probability `p_dormant` (k = 0 never is).
    Cut point: cut_u = floor(phi_u L_u), phi_u ~ U(`dormant_cut_lo`, `dormant_cut_hi`). A dormant interest
    feeds behaviors only at positions j < cut_u; at positions j >= cut_u no behavior of u is in a dormant category
    (any draw that lands there is redrawn from the active interests), i.e. dormant interests are absent from the
    last (1 - phi_u) = 30..50% of the history, yet they still drive clicks through A_lt below.
    user_bias_u = beta_{seg(u)} + eps_u, beta_s ~ N(0, `segment_bias_std`^2), eps_u ~ N(0, `user_bias_std`^2);
    seg(u) ~ U{0..`n_segments`-1} is written as the impression column `user_segment`.

(d) Drifting short-term intent (interest evolution).
    Behaviors come in sessions (a new session starts with probability `p_new_session`). The intent topic I_j
    changes only at session starts, with probability `p_intent_switch`; a change is a reset with probability
    `p_intent_reset` (and always at j = 0), otherwise a random-walk step I_j = (I_{j-1} +- 1) mod T on the topic
    ring. A reset draws the topic of an interest (weights omega_u, dormant ones only before cut_u) with probability
    `p_intent_interest`, else a topic with probability proportional to its popularity mass.
    Behavior j of u draws its item from: an interest category (prob `beh_p_lt`; weights omega_u restricted to active
    interests when j >= cut_u), the intent topic I_j (prob `beh_p_st`), or global popularity (the rest); within a
    category/topic the item is drawn proportionally to pi_i. btype ~ Categorical(`btype_probs`).

(e) Heavy-tailed history lengths.
    L_u = 0 with probability `p_cold`; else with probability `tail_frac` L_u = floor(x_m U^(-1/a)) (Pareto,
    x_m = `tail_xm`, a = `tail_alpha`); else L_u = max(1, floor(exp(log(`len_median`) + `len_sigma` Z))), Z ~ N(0,1).
    All capped at `max_len` (100K); then `n_whales` random users get exactly `max_len` behaviors.
    Timestamps: in-session gaps ~ floor(Exp(`in_session_gap_s`)) seconds (0 is possible: ties), session gaps
    ~ floor(Exp(duration_u / max(1, L_u p_new_session))), duration_u = span * U(`duration_lo`, 1); the history ends
    at end_u = T_end - floor(Exp(2 days)), T_end = T0 + `span_days`; timestamps are clipped below at T0.

(f) Click model. For an impression (u, i, t), with H_u(t) = {behaviors of u with ts < t} (strictly before: a
    behavior at the same second counts as after), n = |H_u(t)| (= hist_len), n_c = |{b in H_u(t): c(b) = c(i)}|:
        M    = sum_{b in H_u(t)} exp((<zhat_i, zhat_b> - 1) / tau),                tau = `lt_tau`
        A_lt = log(1 + M) / log(1 + n + kappa),                                     kappa = `lt_kappa`
        A_st = (1/m) sum_{b in R} <zhat_i, zhat_b>,  R = the last m = min(S, n) behaviors of H_u(t) (0 if n = 0),
               S = `short_window`
        p_true = sigmoid(b0 + w_lt A_lt + w_st A_st + w_pop pop_i + user_bias_u),     label ~ Bernoulli(p_true).
    M is a soft count of the past behaviors semantically close to the target: a behavior on the target item itself
    counts 1, a typical behavior of the same category about 0.25 (0.05..0.6: it depends on where both items sit in
    the category), one of another category of the same topic a few hundredths, an unrelated one ~0. So the category is a
    good but coarse proxy of long-term affinity, and the fine part is visible only through content (mm_emb, a noisy
    view of z) or through well-trained item embeddings -- which rare items do not have. `lt_mode="category"` gives
    the generator-version-1 world instead: M = n_c, the exact count of same-category behaviors.
    A_lt spans the WHOLE history before t (dormant interests count), A_st only the recent past. Every term is a
    function of behaviors strictly before t and of static item/user attributes (no look-ahead), so a model that sees
    sequence[0:hist_len] can in principle reach the oracle AUC of p_true. See `impression_features`.

Impressions. User u gets n_u = `imp_min` + Poisson(`imp_mean` g_u) impressions, g_u = min(((1 + L_u) / (1 +
`len_median`))^`imp_len_power`, `imp_len_gain_max`). Times t = lo_u + floor(V (T_end - lo_u)), V =
U^(1/`imp_time_power`) (density increasing in time, so more impressions late: a time split works), lo_u = max(T0,
first behavior ts - `imp_pre_frac` duration_u) (some impressions precede the whole history: hist_len 0; for users
without behaviors lo_u = end_u - duration_u); with probability `p_imp_tie`, t is set to the ts of a random behavior
of u (an exact tie, which must not be visible). The target item is drawn from: a uniformly chosen interest of u,
dormant ones included (prob `imp_p_lt`); the intent topic at the last behavior before t, a popularity-drawn topic
when there is none (prob `imp_p_st`); global popularity (prob `imp_p_pop`); a uniform random item (the rest).

Raw ids are non-contiguous int64 (random gaps, then shuffled), far outside 0..n, for users, items, categories,
topics and segments.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.schema import MM_EMB_COLUMN, mm_emb_type
from pipelines.outdirs import OutputLock, prepare_raw_dir

logger = logging.getLogger(__name__)

GENERATOR_NAME = "lifelong-ctr.synthetic"
GENERATOR_VERSION = 2
LT_MODES = ("semantic", "category")
T0 = 1_577_836_800  # 2020-01-01 00:00:00 UTC: the earliest possible timestamp
DAY = 86_400

# stream tags of the random generators: default_rng([seed, tag, ...])
_ITEMS, _USERS, _CHUNK = 1, 2, 3


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic world (symbols in the module docstring)."""

    # sizes
    n_users: int
    n_items: int
    n_topics: int
    n_cates: int
    latent_dim: int = 16
    mm_dim: int = 64
    # (a), (b) item space
    zipf_alpha: float = 1.0
    cate_size_sigma: float = 0.8
    topic_smooth: int = 1
    cate_offset_std: float = 0.6
    item_noise_std: float = 0.5
    mm_noise_std: float = 0.5
    # (c) users
    interests_mean: float = 3.0
    max_interests: int = 6
    interest_pop_temper: float = 0.5
    p_dormant: float = 0.4
    dormant_cut_lo: float = 0.5
    dormant_cut_hi: float = 0.7
    n_segments: int = 8
    segment_bias_std: float = 0.3
    user_bias_std: float = 0.3
    # (e) history lengths
    len_median: float = 120.0
    len_sigma: float = 0.85
    tail_frac: float = 0.013
    tail_xm: float = 10_000.0
    tail_alpha: float = 2.2
    max_len: int = 100_000
    n_whales: int = 0
    p_cold: float = 0.02
    # (d) behavior process
    span_days: float = 730.0
    duration_lo: float = 0.2
    p_new_session: float = 0.125
    in_session_gap_s: float = 30.0
    p_intent_switch: float = 0.5
    p_intent_reset: float = 0.3
    p_intent_interest: float = 0.7
    beh_p_lt: float = 0.55
    beh_p_st: float = 0.30
    btype_probs: tuple[float, ...] = (0.8, 0.08, 0.07, 0.05)
    # impressions
    imp_min: int = 3
    imp_mean: float = 45.0
    imp_len_power: float = 0.25
    imp_len_gain_max: float = 8.0
    imp_time_power: float = 2.0
    imp_pre_frac: float = 0.05
    p_imp_tie: float = 0.1
    imp_p_lt: float = 0.35
    imp_p_st: float = 0.25
    imp_p_pop: float = 0.25
    # (f) click model
    b0: float = -4.75
    w_lt: float = 4.5
    w_st: float = 2.5
    w_pop: float = 0.15
    short_window: int = 20
    lt_kappa: float = 10.0
    lt_mode: str = "semantic"
    lt_tau: float = 0.1
    # execution (part of the world: chunking decides the random streams)
    chunk_behaviors: int = 1_000_000
    chunk_users: int = 4096


PRESETS: dict[str, SyntheticConfig] = {
    # a test world: seconds to generate
    "tiny": SyntheticConfig(
        n_users=300,
        n_items=2_000,
        n_topics=12,
        n_cates=80,
        len_median=100.0,
        tail_frac=0.02,
        tail_xm=1_000.0,
        max_len=5_000,
        imp_mean=40.0,
        chunk_behaviors=20_000,
        chunk_users=128,
    ),
    # the embedded default: ~10K users, ~50K items, ~4-5M behaviors, ~500K impressions
    "demo": SyntheticConfig(
        n_users=10_000,
        n_items=50_000,
        n_topics=50,
        n_cates=1_000,
    ),
    # fewer users, a fat tail and whales with 100K behaviors each
    "lifelong": SyntheticConfig(
        n_users=2_000,
        n_items=100_000,
        n_topics=60,
        n_cates=2_000,
        tail_frac=0.1,
        n_whales=50,
        imp_mean=60.0,
        imp_len_power=0.3,
        imp_len_gain_max=10.0,
    ),
}


def resolve_config(preset: str, **overrides: Any) -> SyntheticConfig:
    """The preset's parameters with `overrides` applied (unknown names raise ValueError)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown synthetic parameters: {unknown}")
    if "btype_probs" in overrides:
        overrides["btype_probs"] = tuple(overrides["btype_probs"])
    cfg = replace(PRESETS[preset], **overrides)
    if cfg.lt_mode not in LT_MODES:
        raise ValueError(f"lt_mode must be one of {LT_MODES}, got {cfg.lt_mode!r}")
    if cfg.lt_tau <= 0:
        raise ValueError(f"lt_tau must be > 0, got {cfg.lt_tau}")
    if cfg.n_cates < cfg.n_topics or cfg.n_items < cfg.n_cates:
        raise ValueError("need n_items >= n_cates >= n_topics")
    return cfg


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


def plan_chunks(lengths: np.ndarray, chunk_behaviors: int, chunk_users: int) -> list[tuple[int, int]]:
    """Consecutive user ranges [u0, u1) with about `chunk_behaviors` behaviors and at most `chunk_users` users."""
    n = len(lengths)
    if n == 0:
        return []
    start_off = np.cumsum(lengths) - lengths
    by_beh = start_off // max(chunk_behaviors, 1)
    by_users = np.arange(n) // max(chunk_users, 1)
    cuts = np.flatnonzero((np.diff(by_beh) != 0) | (np.diff(by_users) != 0)) + 1
    bounds = np.concatenate([[0], cuts, [n]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# --------------------------------------------------------------------------------------------------- features


def _choose_slot(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One slot per row of `weights` (rows with positive total), proportionally to the weights."""
    cw = np.cumsum(weights, axis=1)
    x = rng.random(len(weights)) * cw[:, -1]
    return np.minimum((cw <= x[:, None]).sum(axis=1), weights.shape[1] - 1)


def impression_features(
    beh_user: np.ndarray,
    beh_ts: np.ndarray,
    beh_item: np.ndarray,
    imp_user: np.ndarray,
    imp_ts: np.ndarray,
    imp_item: np.ndarray,
    item_cate: np.ndarray,
    item_unit: np.ndarray,
    *,
    short_window: int = 20,
    kappa: float = 10.0,
    lt_mode: str = "semantic",
    lt_tau: float = 0.1,
) -> dict[str, np.ndarray]:
    """The features behind p_true, from behaviors strictly before each impression (ties count as after).

    `beh_*` must be sorted by (user, ts) (ties in input order); users and items are non-negative integer indices
    (`item_cate[item]`, `item_unit[item]`). Returns `hist_len` = n, `n_same_cate` = n_c, `lt_mass` = M (the
    semantic mass; equal to n_c in `lt_mode="category"`), `a_lt`, `a_st` (formulas in the module docstring,
    signal (f)). Vectorized: a few sorts and searchsorted calls, a loop over the S slots, and for the semantic
    mass one matrix product per user (impressions x behaviors, in column blocks).
    """
    if lt_mode not in LT_MODES:
        raise ValueError(f"lt_mode must be one of {LT_MODES}, got {lt_mode!r}")
    beh_user = np.asarray(beh_user, dtype=np.int64)
    beh_ts = np.asarray(beh_ts, dtype=np.int64)
    beh_item = np.asarray(beh_item, dtype=np.int64)
    imp_user = np.asarray(imp_user, dtype=np.int64)
    imp_ts = np.asarray(imp_ts, dtype=np.int64)
    imp_item = np.asarray(imp_item, dtype=np.int64)
    n_imp = len(imp_user)
    if len(beh_user) == 0:
        z = np.zeros(n_imp, dtype=np.int64)
        return {
            "hist_len": z,
            "n_same_cate": z.copy(),
            "lt_mass": np.zeros(n_imp),
            "a_lt": np.zeros(n_imp),
            "a_st": np.zeros(n_imp),
        }
    t_min = min(int(beh_ts.min()), int(imp_ts.min()) if n_imp else int(beh_ts.min()))
    t_max = max(int(beh_ts.max()), int(imp_ts.max()) if n_imp else int(beh_ts.max()))
    tb = (t_max - t_min + 1).bit_length()
    ub = int(max(beh_user.max(), imp_user.max(initial=0)) + 1).bit_length()
    if tb + ub > 62:
        raise ValueError("timestamp range times user count too large for a 62-bit composite key")
    # prefix end: the first behavior of the user at or after t
    key_b = (beh_user << tb) | (beh_ts - t_min)
    key_i = (imp_user << tb) | (imp_ts - t_min)
    pos = np.searchsorted(key_b, key_i, side="left")
    hist_len = pos - np.searchsorted(beh_user, imp_user, side="left")
    # n_c: behaviors of the same (user, category) before t, on a dense (user, category) group id
    n_cates = int(item_cate.max()) + 1
    gid_b = beh_user * n_cates + item_cate[beh_item]
    groups, dense_b = np.unique(gid_b, return_inverse=True)
    gb = int(len(groups)).bit_length()
    if gb + tb > 62:
        raise ValueError("too many (user, category) groups for a 62-bit composite key")
    key_g = np.sort((dense_b.astype(np.int64) << tb) | (beh_ts - t_min))
    gid_i = imp_user * n_cates + item_cate[imp_item]
    slot = np.minimum(np.searchsorted(groups, gid_i), len(groups) - 1)
    found = groups[slot] == gid_i
    lo = np.searchsorted(key_g, slot << tb, side="left")
    hi = np.searchsorted(key_g, (slot << tb) | (imp_ts - t_min), side="left")
    n_same = np.where(found, hi - lo, 0)
    if lt_mode == "category":
        mass = n_same.astype(np.float64)
    else:
        mass = semantic_mass(beh_user, beh_item, imp_user, imp_item, hist_len, item_unit, lt_tau)
    a_lt = np.log1p(mass) / np.log1p(hist_len + kappa)
    # A_st: mean cosine of the target with the last min(S, n) behaviors before t
    target = item_unit[imp_item]
    acc = np.zeros(n_imp)
    for s in range(short_window):
        ok = hist_len > s
        b = np.where(ok, pos - 1 - s, 0)
        acc += np.where(ok, np.einsum("ij,ij->i", item_unit[beh_item[b]], target), 0.0)
    m = np.minimum(hist_len, short_window)
    a_st = np.where(m > 0, acc / np.maximum(m, 1), 0.0)
    return {"hist_len": hist_len, "n_same_cate": n_same, "lt_mass": mass, "a_lt": a_lt, "a_st": a_st}


def semantic_mass(
    beh_user: np.ndarray,
    beh_item: np.ndarray,
    imp_user: np.ndarray,
    imp_item: np.ndarray,
    hist_len: np.ndarray,
    item_unit: np.ndarray,
    tau: float,
    block: int = 8192,
) -> np.ndarray:
    """M = sum over the first `hist_len` behaviors b of the impression's user of exp((<zhat_i, zhat_b> - 1) / tau).

    `beh_user` sorted (each user's behaviors contiguous, in time order). One (impressions x behaviors) product per
    user that has both, over column blocks of `block` behaviors so a whale's 100K history stays within memory.
    """
    mass = np.zeros(len(imp_user))
    if len(beh_user) == 0 or len(imp_user) == 0:
        return mass
    order = np.argsort(imp_user, kind="stable")
    users, first = np.unique(imp_user[order], return_index=True)
    last = np.append(first[1:], len(order))
    b_lo = np.searchsorted(beh_user, users, side="left")
    b_hi = np.searchsorted(beh_user, users, side="right")
    for k in np.flatnonzero(b_hi > b_lo):
        rows = order[first[k] : last[k]]
        n = hist_len[rows]
        top = int(n.max())
        if top == 0:
            continue
        target = item_unit[imp_item[rows]]
        acc = np.zeros(len(rows))
        for j0 in range(0, top, block):
            j1 = min(j0 + block, top)
            sim = target @ item_unit[beh_item[b_lo[k] + j0 : b_lo[k] + j1]].T
            kern = np.exp((sim - 1.0) / tau)
            kern[np.arange(j0, j1)[None, :] >= n[:, None]] = 0.0
            acc += kern.sum(axis=1)
        mass[rows] = acc
    return mass


def click_probability(
    cfg: SyntheticConfig, a_lt: np.ndarray, a_st: np.ndarray, pop: np.ndarray, user_bias: np.ndarray
) -> np.ndarray:
    """p_true = sigmoid(b0 + w_lt A_lt + w_st A_st + w_pop pop + user_bias)."""
    logit = cfg.b0 + cfg.w_lt * a_lt + cfg.w_st * a_st + cfg.w_pop * pop + user_bias
    return 1.0 / (1.0 + np.exp(-logit))


# --------------------------------------------------------------------------------------------------- simulation


def _draw_interest_items(
    rng: np.random.Generator, items: ItemWorld, interests: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Per row: an interest slot by `weights`, then an item of that category by popularity."""
    cate = interests[np.arange(len(weights)), _choose_slot(rng, weights)]
    return _sample_in_ranges(rng, items.item_cdf, items.cate_lo[cate], items.cate_hi[cate], len(cate))


def simulate_chunk(
    cfg: SyntheticConfig, items: ItemWorld, users: UserWorld, u0: int, u1: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Behaviors and impressions of users [u0, u1), with internal indices (`user` is global, `item` internal).

    Behaviors are sorted by (user, ts); impressions by (user, ts).
    """
    lengths = users.lengths[u0:u1]
    nu, nb = u1 - u0, int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    b_loc = np.repeat(np.arange(nu), lengths)
    b_glob = b_loc + u0
    pos = np.arange(nb) - starts[b_loc]
    after_cut = pos >= users.cut[b_glob]
    active_w = np.where(users.dormant, 0.0, users.weights)

    def interest_weights(glob: np.ndarray, late: np.ndarray) -> np.ndarray:
        return np.where(late[:, None], active_w[glob], users.weights[glob])

    # timestamps: sessions, in-session gaps (0 s gaps make ties), the history ends at end_u
    first = pos == 0
    new_session = (rng.random(nb) < cfg.p_new_session) | first
    expected_sessions = np.maximum(1.0, lengths * cfg.p_new_session)
    session_gap_mean = users.duration[u0:u1] / expected_sessions
    long_gap = np.floor(rng.exponential(1.0, size=nb) * session_gap_mean[b_loc])
    short_gap = np.floor(rng.exponential(cfg.in_session_gap_s, size=nb))
    gaps = np.where(new_session, long_gap, short_gap).astype(np.int64)
    gaps[first] = 0
    cum = np.cumsum(gaps)
    if nb:
        cum -= cum[starts[b_loc]]
    total = np.zeros(nu, dtype=np.int64)
    has = lengths > 0
    total[has] = cum[starts[has] + lengths[has] - 1]
    ts = np.maximum(users.end_ts[b_glob] - (total[b_loc] - cum), T0)

    # short-term intent: a random walk on the topic ring with resets at some session starts
    switch = first | (new_session & (rng.random(nb) < cfg.p_intent_switch))
    reset = first | (switch & (rng.random(nb) < cfg.p_intent_reset))
    step = np.where(switch & ~reset, rng.integers(0, 2, size=nb) * 2 - 1, 0)
    r_idx = np.flatnonzero(reset)
    r_glob = b_glob[r_idx]
    from_interest = rng.random(len(r_idx)) < cfg.p_intent_interest
    cate_r = users.interests[r_glob, _choose_slot(rng, interest_weights(r_glob, after_cut[r_idx]))]
    topic_pop = np.minimum(
        np.searchsorted(items.topic_cdf, rng.random(len(r_idx)) * items.topic_cdf[-1], "right"), cfg.n_topics - 1
    )
    reset_topic = np.where(from_interest, items.cate_topic[cate_r], topic_pop)
    seg = np.cumsum(reset) - 1
    cs = np.cumsum(step)
    intent = (reset_topic[seg] + cs - cs[r_idx][seg]) % cfg.n_topics

    # behavior items: long-term interest / intent topic / global popularity
    src = rng.random(nb)
    beh_item = np.empty(nb, dtype=np.int64)
    lt = np.flatnonzero(src < cfg.beh_p_lt)
    beh_item[lt] = _draw_interest_items(
        rng, items, users.interests[b_glob[lt]], interest_weights(b_glob[lt], after_cut[lt])
    )
    st = np.flatnonzero((src >= cfg.beh_p_lt) & (src < cfg.beh_p_lt + cfg.beh_p_st))
    tp = intent[st]
    beh_item[st] = _sample_in_ranges(rng, items.item_cdf, items.topic_lo[tp], items.topic_hi[tp], len(st))
    gp = np.flatnonzero(src >= cfg.beh_p_lt + cfg.beh_p_st)
    beh_item[gp] = _sample_in_ranges(rng, items.item_cdf, 0, cfg.n_items, len(gp))
    # dormancy: after cut_u nothing lands in a dormant category (redrawn from the active interests)
    late = np.flatnonzero(after_cut)
    dorm = users.dormant_categories()
    hit = late[(dorm[b_glob[late]] == items.item_cate[beh_item[late], None]).any(axis=1)]
    beh_item[hit] = _draw_interest_items(rng, items, users.interests[b_glob[hit]], active_w[b_glob[hit]])
    btype = np.minimum(
        np.searchsorted(np.cumsum(cfg.btype_probs), rng.random(nb) * sum(cfg.btype_probs), "right"),
        len(cfg.btype_probs) - 1,
    ).astype(np.int8)

    # impressions: times skewed late, some before the history, some tied with a behavior
    n_imp = users.n_impressions[u0:u1]
    ni = int(n_imp.sum())
    i_loc = np.repeat(np.arange(nu), n_imp)
    i_glob = i_loc + u0
    dur = users.duration[u0:u1]
    first_ts = users.end_ts[u0:u1] - dur  # cold users: their nominal window
    first_ts[has] = ts[starts[has]]
    lo_t = np.maximum(first_ts - has * np.floor(cfg.imp_pre_frac * dur).astype(np.int64), T0)
    t_end = T0 + int(cfg.span_days * DAY)
    v = rng.random(ni) ** (1.0 / cfg.imp_time_power)
    imp_ts = lo_t[i_loc] + np.floor(v * (t_end - lo_t[i_loc])).astype(np.int64)
    tie = (rng.random(ni) < cfg.p_imp_tie) & has[i_loc]
    pick = starts[i_loc] + np.floor(rng.random(ni) * lengths[i_loc]).astype(np.int64)
    if nb:
        imp_ts = np.where(tie, ts[np.minimum(pick, nb - 1)], imp_ts)
    order = np.lexsort((imp_ts, i_loc))
    imp_ts = imp_ts[order]  # i_loc is already sorted, so it is unchanged by `order`
    # the intent at the last behavior before t (a popularity topic when there is none)
    shift = (t_end - T0 + 1).bit_length()
    if shift + nu.bit_length() > 62:
        raise ValueError("chunk_users too large for a 62-bit (user, ts) key")
    key_b = (b_loc.astype(np.int64) << shift) | (ts - T0)
    key_i = (i_loc.astype(np.int64) << shift) | (imp_ts - T0)
    prefix_end = np.searchsorted(key_b, key_i, side="left")
    h = prefix_end - starts[i_loc]
    topic_fallback = np.minimum(
        np.searchsorted(items.topic_cdf, rng.random(ni) * items.topic_cdf[-1], "right"), cfg.n_topics - 1
    )
    imp_intent = np.where(h > 0, intent[np.maximum(prefix_end - 1, 0)] if nb else 0, topic_fallback)

    # impression targets: any interest (dormant included) / intent topic / popularity / uniform random
    src = rng.random(ni)
    c1, c2, c3 = cfg.imp_p_lt, cfg.imp_p_lt + cfg.imp_p_st, cfg.imp_p_lt + cfg.imp_p_st + cfg.imp_p_pop
    imp_item = rng.integers(0, cfg.n_items, size=ni)  # the uniform random part
    lt = np.flatnonzero(src < c1)
    imp_item[lt] = _draw_interest_items(
        rng, items, users.interests[i_glob[lt]], (users.interests[i_glob[lt]] >= 0).astype(np.float64)
    )
    st = np.flatnonzero((src >= c1) & (src < c2))
    tp = imp_intent[st]
    imp_item[st] = _sample_in_ranges(rng, items.item_cdf, items.topic_lo[tp], items.topic_hi[tp], len(st))
    gp = np.flatnonzero((src >= c2) & (src < c3))
    imp_item[gp] = _sample_in_ranges(rng, items.item_cdf, 0, cfg.n_items, len(gp))

    feats = impression_features(
        b_loc,
        ts,
        beh_item,
        i_loc,
        imp_ts,
        imp_item,
        items.item_cate,
        items.unit,
        short_window=cfg.short_window,
        kappa=cfg.lt_kappa,
        lt_mode=cfg.lt_mode,
        lt_tau=cfg.lt_tau,
    )
    p_true = click_probability(cfg, feats["a_lt"], feats["a_st"], items.pop_score[imp_item], users.bias[i_glob])
    label = (rng.random(ni) < p_true).astype(np.int8)
    behaviors = {"user": b_glob, "item": beh_item, "ts": ts, "btype": btype}
    impressions = {"user": i_glob, "item": imp_item, "ts": imp_ts, "label": label, "p_true": p_true, **feats}
    return behaviors, impressions


# --------------------------------------------------------------------------------------------------- output


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact, tie-aware ROC AUC (Mann-Whitney with average ranks); nan without both classes."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg_rank = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _items_table(items: ItemWorld, cfg: SyntheticConfig) -> pa.Table:
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array(items.mm_emb.ravel(), type=pa.float32()), type=mm_emb_type(cfg.mm_dim)
    )
    return pa.table(
        {
            "item_id": pa.array(items.item_ids, type=pa.int64()),
            "cate_id": pa.array(items.cate_ids[items.item_cate], type=pa.int64()),
            "topic_id": pa.array(items.topic_ids[items.item_topic], type=pa.int64()),
            MM_EMB_COLUMN: emb,
        }
    )


def _percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(np.max(x))}


def generate(preset: str, seed: int, out_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Write the synthetic raw directory `out_dir` and return its summary (rows, lengths, CTR, oracle AUC).

    `overrides` replace preset parameters by name (see `SyntheticConfig`). `out_dir` must be new, empty, or a raw
    directory that `ctr generate` or `ctr import` wrote (it holds source.json); anything else is an OutputError.
    Generating again into a raw directory replaces its tables and source.json (only those, see
    `pipelines.outdirs.RAW_OUTPUTS`), so a rerun never mixes worlds; until the new source.json is written the
    directory is marked incomplete and `ctr build` refuses it.
    """
    t_start = time.perf_counter()
    cfg = resolve_config(preset, **overrides)
    with OutputLock(out_dir, "raw directory"):
        return _generate_into(prepare_raw_dir(out_dir, "ctr generate"), cfg, preset, seed, t_start)


def _generate_into(out: Path, cfg: SyntheticConfig, preset: str, seed: int, t_start: float) -> dict[str, Any]:
    items = build_items(cfg, seed)
    users = build_users(cfg, items, seed)
    pq.write_table(_items_table(items, cfg), out / "items.parquet")
    beh_dir, imp_dir = out / "behaviors", out / "impressions"
    beh_dir.mkdir()
    imp_dir.mkdir()
    chunks = plan_chunks(users.lengths, cfg.chunk_behaviors, cfg.chunk_users)
    n_beh = 0
    labels, p_true, pop, hist_len = [], [], [], []
    for ci, (u0, u1) in enumerate(chunks):
        beh, imp = simulate_chunk(cfg, items, users, u0, u1, _rng(seed, _CHUNK, ci))
        name = f"part-{ci:05d}.parquet"
        pq.write_table(
            pa.table(
                {
                    "user_id": pa.array(users.user_ids[beh["user"]], type=pa.int64()),
                    "item_id": pa.array(items.item_ids[beh["item"]], type=pa.int64()),
                    "ts": pa.array(beh["ts"], type=pa.int64()),
                    "btype": pa.array(beh["btype"], type=pa.int8()),
                }
            ),
            beh_dir / name,
        )
        pq.write_table(
            pa.table(
                {
                    "user_id": pa.array(users.user_ids[imp["user"]], type=pa.int64()),
                    "item_id": pa.array(items.item_ids[imp["item"]], type=pa.int64()),
                    "ts": pa.array(imp["ts"], type=pa.int64()),
                    "label": pa.array(imp["label"], type=pa.int8()),
                    "user_segment": pa.array(users.segment_ids[users.segment[imp["user"]]], type=pa.int64()),
                    "p_true": pa.array(imp["p_true"], type=pa.float64()),
                }
            ),
            imp_dir / name,
        )
        n_beh += len(beh["user"])
        labels.append(imp["label"])
        p_true.append(imp["p_true"])
        pop.append(items.pop_score[imp["item"]])
        hist_len.append(imp["hist_len"])
        logger.info(
            "chunk %d/%d: users [%d, %d), %d behaviors, %d impressions",
            ci + 1,
            len(chunks),
            u0,
            u1,
            len(beh["user"]),
            len(imp["user"]),
        )
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int8)
    pt = np.concatenate(p_true) if p_true else np.zeros(0)
    hl = np.concatenate(hist_len) if hist_len else np.zeros(0, np.int64)
    summary: dict[str, Any] = {
        "generator": GENERATOR_NAME,
        "preset": preset,
        "seed": seed,
        "rows": {"items": cfg.n_items, "behaviors": n_beh, "impressions": int(len(lab))},
        "users": cfg.n_users,
        "items": cfg.n_items,
        "behavior_parts": len(chunks),
        "history_length": _percentiles(users.lengths),
        "impression_hist_len": _percentiles(hl),
        "impressions_with_empty_history": int((hl == 0).sum()),
        "base_ctr": float(lab.mean()) if len(lab) else float("nan"),
        "mean_p_true": float(pt.mean()) if len(pt) else float("nan"),
        "oracle_auc": auc(lab, pt),
        "popularity_auc": auc(lab, np.concatenate(pop) if pop else np.zeros(0)),
    }
    source = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": seed,
        "params": asdict(cfg),
        "click_model": "p_true = sigmoid(b0 + w_lt*A_lt + w_st*A_st + w_pop*pop + user_bias); "
        + (
            "A_lt = log1p(M)/log1p(hist_len + lt_kappa), M = sum over past behaviors of "
            "exp((cosine(z_target, z_b) - 1)/lt_tau); "
            if cfg.lt_mode == "semantic"
            else "A_lt = log1p(n_same_cate)/log1p(hist_len + lt_kappa); "
        )
        + "A_st = mean cosine(target, last short_window behaviors); all over behaviors with ts < impression ts",
        "rows": summary["rows"],
        "summary": summary,
    }
    (out / "source.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    logger.info("generated %s (seed %d) into %s in %.1f s", preset, seed, out, summary["seconds"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.synthetic --preset tiny --seed 0 --out RAW_DIR [--set name=value ...]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], help="override a parameter: name=value (JSON value)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = generate(args.preset, args.seed, args.out, **overrides)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
