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

Modules: `config` (SyntheticConfig, PRESETS, overrides), `world` (items and users), `simulation` (behaviors,
impressions, click model), `writer` (`generate`, the tables and source.json, `main`); the AUC is `features.stats.auc`.
Run as `python -m pipelines.synthetic --preset tiny --seed 0 --out RAW_DIR [--set name=value ...]` or `ctr generate`.
"""

from features.stats import auc
from pipelines.synthetic.config import (
    DAY,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    LT_MODES,
    PRESETS,
    T0,
    SyntheticConfig,
    parse_overrides,
    resolve_config,
)
from pipelines.synthetic.simulation import (
    click_probability,
    impression_features,
    plan_chunks,
    semantic_mass,
    simulate_chunk,
)
from pipelines.synthetic.world import ItemWorld, UserWorld, build_items, build_users, sample_history_lengths
from pipelines.synthetic.writer import generate, main

__all__ = [
    "DAY",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "LT_MODES",
    "PRESETS",
    "T0",
    "ItemWorld",
    "SyntheticConfig",
    "UserWorld",
    "auc",
    "build_items",
    "build_users",
    "click_probability",
    "generate",
    "impression_features",
    "main",
    "parse_overrides",
    "plan_chunks",
    "resolve_config",
    "sample_history_lengths",
    "semantic_mass",
    "simulate_chunk",
]
