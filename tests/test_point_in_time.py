"""The reduce side of the builder (`pipelines.partition.reduce_partition`) on random logs with ties: the
strictly-before rule, input order at ties, and equality with the readable per-user reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipelines.partition import reduce_partition, sort_key
from pipelines.reference import reference_partition
from pipelines.rows import SOURCE_ROW_BITS, block_schema
from pipelines.vocab import ItemLookup

CTX_VOCAB = {"slot": np.array([3, 7, 9], dtype=np.int64)}
ITEMS = ItemLookup(vocab=np.arange(2, 7, dtype=np.int64) * 1000, cate_of_item=np.array([0, 0, 4, 2, 3, 4, 2], np.int32))


@st.composite
def partition_logs(draw, max_users: int = 4):
    """Rows of a few users in a narrow time range (many ties), arriving in any order, with duplicates."""
    n_users = draw(st.integers(1, max_users))
    users = draw(st.lists(st.integers(-(2**40), 2**40), min_size=n_users, max_size=n_users, unique=True))
    max_ts = draw(st.integers(0, 12))
    n_b = draw(st.integers(0, 40))
    n_i = draw(st.integers(0, 15))
    assume(n_b + n_i > 0)
    row = st.tuples(st.sampled_from(users), st.integers(0, max_ts + 1), st.integers(2, 6), st.integers(0, 2))
    beh = draw(st.lists(row, min_size=n_b, max_size=n_b))
    imp = draw(st.lists(row, min_size=n_i, max_size=n_i))
    slots = draw(st.lists(st.sampled_from([None, 3, 7, 8, 9]), min_size=n_i, max_size=n_i))
    b_order = draw(st.permutations(range(n_b)))
    i_order = draw(st.permutations(range(n_i)))
    return beh, imp, slots, b_order, i_order


def _tables(beh, imp, slots, b_order, i_order) -> tuple[pa.Table, pa.Table]:
    """Block tables whose source_row is the input order; rows arrive permuted (the reduce side must not care)."""

    def cols(rows, order, table):
        n = len(rows)
        c = {
            "user_id": np.array([r[0] for r in rows], np.int64),
            "item_idx": np.array([r[2] for r in rows], np.int32),
            "ts": np.array([r[1] for r in rows], np.int64),
            # two files, interleaved rows: (file i % 2, row i // 2)
            "source": (np.arange(n, dtype=np.int64) % 2 << SOURCE_ROW_BITS) | (np.arange(n, dtype=np.int64) // 2),
        }
        if table == "behaviors":
            c["btype"] = pa.array([r[3] if r[3] else None for r in rows], pa.int8())  # null btype == 0
        else:
            c["label"] = np.array([r[3] % 2 for r in rows], np.int8)
            c["p_true"] = np.linspace(0, 1, n)
            c["slot"] = pa.array(slots, pa.int64())
        tbl = pa.table(c, schema=block_schema(table, ["slot"], has_btype=True, has_p_true=True))
        return tbl.take(pa.array(np.asarray(order, np.int64))) if n else tbl

    return cols(beh, b_order, "behaviors"), cols(imp, i_order, "impressions")


@settings(max_examples=300, deadline=None)
@given(partition_logs())
def test_equals_the_per_user_reference(log):
    beh, imp = _tables(*log)
    got = reduce_partition(beh, imp, ITEMS, CTX_VOCAB)
    want = reference_partition(beh, imp, ITEMS, CTX_VOCAB)
    assert got["sequences"].to_pydict() == want["sequences"]
    samples = got["samples"].to_pydict()
    assert sorted(zip(*samples.values(), strict=True), key=repr) == sorted(
        zip(*(want["samples"][k] for k in samples), strict=True), key=repr
    )
    assert got["duplicates"].keys() == want["duplicates"].keys()
    for name, rows in got["duplicates"].items():
        assert rows.sort_by([("source_file", "ascending"), ("source_row", "ascending")]).equals(
            want["duplicates"][name].sort_by([("source_file", "ascending"), ("source_row", "ascending")])
        )


@settings(max_examples=300, deadline=None)
@given(partition_logs(max_users=1))
def test_hist_len_is_count_strictly_before(log):
    beh_rows, imp_rows, *_ = log
    beh, imp = _tables(*log)
    out = reduce_partition(beh, imp, ITEMS, CTX_VOCAB)
    seq = out["sequences"].to_pylist()[0]
    distinct_b = {(ts, item, bt) for _, ts, item, bt in beh_rows}
    assert seq["ts"] == sorted(seq["ts"]) and len(seq["ts"]) == len(distinct_b)
    samples = out["samples"].to_pydict()
    assert len(samples["ts"]) == len({(ts, item) for _, ts, item, _ in imp_rows})
    for ts, hist_len in zip(samples["ts"], samples["hist_len"], strict=True):
        assert hist_len == sum(1 for t, _, _ in distinct_b if t < ts)
        assert all(t < ts for t in seq["ts"][:hist_len])  # nothing at or after the sample's ts is visible
        assert all(t >= ts for t in seq["ts"][hist_len:])


@settings(max_examples=100, deadline=None)
@given(partition_logs(max_users=1))
def test_ties_keep_input_order(log):
    """Behaviors at the same ts stay in input order (source_file, source_row), whatever order rows arrive in."""
    beh, imp = _tables(*log)
    seq = reduce_partition(beh, imp, ITEMS, CTX_VOCAB)["sequences"].to_pylist()
    if not beh.num_rows:
        return
    rows = sorted(range(beh.num_rows), key=lambda i: beh["source"][i].as_py())  # input order
    first: dict[tuple, int] = {}
    for rank, i in enumerate(rows):
        key = (beh["ts"][i].as_py(), beh["item_idx"][i].as_py(), beh["btype"][i].as_py() or 0)
        first.setdefault(key, rank)
    expected = [(k[0], k[1]) for k in sorted(first, key=lambda k: (k[0], first[k]))]
    assert list(zip(seq[0]["ts"], seq[0]["item_idx"], strict=True)) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**63 - 1), st.integers(0, 1)), max_size=30))
def test_sort_key_orders_like_the_tuple(rows):
    """Packed keys sort like (user, ts, kind), also when the raw ranges need all 64 bits (dense ranks)."""
    user = np.array([r[0] for r in rows], np.int64)
    ts = np.array([r[1] for r in rows], np.int64)
    kind = np.array([r[2] for r in rows], np.int8)
    key, shift = sort_key(user, ts, kind)
    by_key = sorted(range(len(rows)), key=lambda i: (key[i], i))
    by_tuple = sorted(range(len(rows)), key=lambda i: (rows[i], i))
    assert [rows[i] for i in by_key] == [rows[i] for i in by_tuple]
    for i in range(len(rows)):  # the user part alone orders users
        for j in range(len(rows)):
            assert (key[i] >> shift < key[j] >> shift) == (rows[i][0] < rows[j][0])
