"""The pieces that let the builder scale: range partitions, exact distributed split quantiles, percentiles from
counts, the item lookup table, and a dataset that does not depend on how the work was cut."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from dataset_content import assert_same_content
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.build import build_dataset
from pipelines.config import load_build_config
from pipelines.manifest import LENGTH_PERCENTILES, merge_counts, percentiles
from pipelines.partition import histogram, quantile_rank, select_ranks, values_in
from pipelines.rows import partition_rows, user_bounds
from pipelines.vocab import IdMap, map_ids


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 2**62), min_size=1, max_size=300),
    st.integers(1, 5),
    st.sampled_from([1, 3, 1 << 20]),
    st.floats(0, 1),
)
def test_select_ranks_is_np_quantile_higher(values, n_parts, max_bin_values, q):
    """Exact order statistics from per-partition histograms, also when bins must be split again (few values per
    gather), with heavy ties and values spread over 62 bits."""
    x = np.array(values + values[: len(values) // 2], dtype=np.int64)  # duplicates
    parts = np.array_split(np.random.default_rng(len(x)).permutation(x), n_parts)
    lo, hi = int(x.min()), int(x.max())
    width = -(-(hi - lo + 1) // 65_536)
    counts = np.sum([histogram(p, lo, None, width, 65_536) for p in parts], axis=0)

    def hist_fn(a, end, w):
        return np.sum([histogram(p, a, end, w, 65_536) for p in parts], axis=0)

    def values_fn(a, end):
        return np.concatenate([values_in(p, a, end) for p in parts])

    qs = [q, 0.0, 1.0, 1.0 - 0.1 - 0.1]
    got = select_ranks([quantile_rank(len(x), v) for v in qs], lo, width, counts, hist_fn, values_fn, max_bin_values)
    assert got == [int(np.quantile(x, v, method="higher")) for v in qs]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=500), st.integers(1, 4))
def test_percentiles_from_partition_counts_equal_numpy(values, n_parts):
    x = np.array(values, dtype=np.int64)
    parts = [np.unique(p, return_counts=True) for p in np.array_split(x, n_parts)]
    got = percentiles(*merge_counts(parts))
    want = {f"p{p:g}": float(np.percentile(x, p)) for p in LENGTH_PERCENTILES} | {"mean": float(x.mean())}
    assert got == want


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200), st.integers(1, 9))
def test_range_partitions_cover_every_row_once_in_order(user_ids, partitions):
    ids = np.array(user_ids, dtype=np.int64)
    bounds = user_bounds([ids[::2], ids[1::2]], partitions)
    # compared, not subtracted: ids span the whole int64 range, where np.diff overflows
    assert len(bounds) <= partitions - 1 and np.all(bounds[1:] > bounds[:-1])
    rows = pa.table({"user_id": ids, "pos": np.arange(len(ids))})
    blocks = partition_rows(rows, bounds)
    assert len(blocks) == len(bounds) + 1
    assert sorted(np.concatenate([b["pos"].to_numpy() for b in blocks]).tolist()) == list(range(len(ids)))
    for p, b in enumerate(blocks):
        assert np.all(np.diff(b["pos"].to_numpy()) > 0)  # input order kept inside a block
        u = b["user_id"].to_numpy()
        assert p == 0 or np.all(u >= bounds[p - 1])
        assert p == len(bounds) or np.all(u < bounds[p])


@pytest.mark.parametrize("spread", [1, 3, 1000, 2**40])
def test_id_map_lookup_table_equals_searchsorted(spread):
    rng = np.random.default_rng(spread)
    vocab = np.unique(rng.integers(0, 5000 * spread, 5000))
    raw = np.concatenate([rng.choice(vocab, 2000), rng.integers(-10, 5000 * spread + 10, 2000), [-(2**63), 2**63 - 1]])
    m = IdMap(vocab)
    assert (m.lut is not None) == (spread < 1000)
    got, want = m(raw), map_ids(vocab, raw)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_dataset_does_not_depend_on_tasks_or_partitions(tmp_path, ray_local, tiny_data):
    """One partition and one task per file, or 7 partitions and small tasks: the same dataset as the session's
    tiny build (default config)."""
    from pipelines.synthetic import generate

    raw = tmp_path / "raw"
    generate("tiny", 0, raw)
    build_dataset(raw, tmp_path / "one", load_build_config(None, ["ray.num_partitions=1", "ray.rows_per_task=9999999"]))
    build_dataset(raw, tmp_path / "many", load_build_config(None, ["ray.num_partitions=7", "ray.rows_per_task=3000"]))
    assert_same_content(tmp_path / "one", tiny_data)
    assert_same_content(tmp_path / "many", tiny_data)
