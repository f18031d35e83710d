"""Parameters of the synthetic world: `SyntheticConfig`, the presets, overrides and `--set` parsing.

Symbols and formulas are in the docstring of `pipelines.synthetic`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

from features.config import ConfigError, parse_set

GENERATOR_NAME = "lifelong-ctr.synthetic"
GENERATOR_VERSION = 2
LT_MODES = ("semantic", "category")
T0 = 1_577_836_800  # 2020-01-01 00:00:00 UTC: the earliest possible timestamp
DAY = 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic world (symbols in the docstring of `pipelines.synthetic`)."""

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
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown synthetic parameters: {unknown} (check the spelling; see SyntheticConfig)")
    if "btype_probs" in overrides:
        overrides["btype_probs"] = tuple(overrides["btype_probs"])
    cfg = replace(PRESETS[preset], **overrides)
    if cfg.lt_mode not in LT_MODES:
        raise ConfigError(f"lt_mode must be one of {LT_MODES}, got {cfg.lt_mode!r}")
    if cfg.lt_tau <= 0:
        raise ConfigError(f"lt_tau must be > 0, got {cfg.lt_tau}")
    if cfg.n_cates < cfg.n_topics or cfg.n_items < cfg.n_cates:
        raise ConfigError("need n_items >= n_cates >= n_topics")
    return cfg


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set name=value` strings as keyword overrides for `resolve_config`, in the one grammar of every command
    (`features.config.parse_set`, values in YAML: ``n_users=50``, ``btype_probs=[0.5,0.5]``, ``lt_mode=category``)."""
    overrides = parse_set(list(items))
    nested = sorted(k for k, v in overrides.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(f"--set {nested[0]}.…: synthetic parameters are flat names (see SyntheticConfig)")
    return overrides
