"""The simulation: behaviors, impressions, the click model and labels of one chunk of users (signals (d), (f)).

`impression_features` and `click_probability` are the ground truth (the oracle p_true); formulas in
`pipelines.synthetic`.
"""

from __future__ import annotations

import numpy as np

from pipelines.synthetic.config import DAY, LT_MODES, T0, SyntheticConfig
from pipelines.synthetic.world import ItemWorld, UserWorld, _sample_in_ranges


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
    semantic mass; equal to n_c in `lt_mode="category"`), `a_lt`, `a_st` (formulas in the package docstring,
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
