"""Property tests of the strictly-before rule on random logs with ties (the per-user step of the builder)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipelines.build import KIND_BEHAVIOR, KIND_IMPRESSION, user_row, work_schema

USER_VOCAB = np.array([5, 42, 77], dtype=np.int64)


@st.composite
def user_logs(draw):
    n_b = draw(st.integers(0, 40))
    n_i = draw(st.integers(0, 15))
    assume(n_b + n_i > 0)  # a user exists because it has at least one row
    max_ts = draw(st.integers(0, 12))  # a narrow time range forces many ties
    b_ts = draw(st.lists(st.integers(0, max_ts), min_size=n_b, max_size=n_b))
    b_item = draw(st.lists(st.integers(2, 6), min_size=n_b, max_size=n_b))
    i_ts = draw(st.lists(st.integers(0, max_ts + 1), min_size=n_i, max_size=n_i))
    i_item = draw(st.lists(st.integers(2, 6), min_size=n_i, max_size=n_i))
    order = draw(st.permutations(range(n_b + n_i)))  # rows arrive in any order
    return b_ts, b_item, i_ts, i_item, order


def _work_table(b_ts, b_item, i_ts, i_item, order) -> pa.Table:
    n_b, n_i = len(b_ts), len(i_ts)
    kind = np.array([KIND_BEHAVIOR] * n_b + [KIND_IMPRESSION] * n_i, np.int8)
    ts = np.array(b_ts + i_ts, np.int64)
    item = np.array(b_item + i_item, np.int32)
    n = n_b + n_i
    cols = {
        "kind": kind,
        "user_id": np.full(n, 42, np.int64),
        "item_id": item.astype(np.int64) * 1000,
        "item_idx": item,
        "cate_idx": item % 3 + 2,
        "ts": ts,
        "source_file": np.zeros(n, np.int32),
        "source_row": np.arange(n, dtype=np.int64),  # input order = position before the shuffle below
        "label": np.where(kind == KIND_IMPRESSION, 1, 0).astype(np.int8),
        "btype": np.zeros(n, np.int8),
    }
    tbl = pa.table(cols, schema=work_schema([], has_btype=True, has_p_true=False))
    return tbl.take(pa.array(np.asarray(order, np.int64))) if n else tbl


@settings(max_examples=300, deadline=None)
@given(user_logs())
def test_hist_len_is_count_strictly_before(log):
    b_ts, b_item, i_ts, i_item, order = log
    row = user_row(_work_table(*log), USER_VOCAB, []).to_pylist()[0]
    distinct_b = sorted(set(zip(b_ts, b_item, strict=True)))
    seq_ts = row["ts"]
    assert seq_ts == sorted(seq_ts)
    assert len(seq_ts) == len(distinct_b)
    assert row["user_idx"] == 3  # rank of 42 in USER_VOCAB + 2
    for ts, hist_len in zip(row["s_ts"], row["s_hist_len"], strict=True):
        assert hist_len == sum(1 for t, _ in distinct_b if t < ts)
        assert all(t < ts for t in seq_ts[:hist_len])  # nothing at or after the sample's ts is visible
        assert all(t >= ts for t in seq_ts[hist_len:])
    distinct_i = set(zip(i_ts, i_item, strict=True))
    assert len(row["s_ts"]) == len(distinct_i)
    assert len(row["dup_kind"]) == (len(b_ts) - len(distinct_b)) + (len(i_ts) - len(distinct_i))


@settings(max_examples=100, deadline=None)
@given(user_logs())
def test_ties_keep_input_order(log):
    """Behaviors at the same ts stay in input order (source_file, source_row), whatever order rows arrive in."""
    b_ts, b_item, *_ = log
    row = user_row(_work_table(*log), USER_VOCAB, []).to_pylist()[0]
    first_seen: dict[tuple[int, int], int] = {}
    for pos, key in enumerate(zip(b_ts, b_item, strict=True)):
        first_seen.setdefault(key, pos)
    expected = sorted(first_seen, key=lambda k: (k[0], first_seen[k]))
    assert list(zip(row["ts"], row["item_idx"], strict=True)) == expected
