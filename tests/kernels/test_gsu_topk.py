"""gsu_topk: the reference against a brute-force definition, and Triton against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import gsu_topk
from kernels._backend import triton_available
from kernels.reference.gsu_topk import jagged_topk_newest_first, topk_newest_first

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton does not import")


def offsets_from(lengths: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets


def brute_force(scores: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, Python's sort by (score, position) descending over the non-excluded behaviors."""
    batch = offsets.numel() - 1
    positions = torch.full((batch, k), -1, dtype=torch.int64)
    values = torch.zeros(batch, k)
    for b in range(batch):
        sample = scores[offsets[b] : offsets[b + 1]].tolist()
        ranked = sorted(((s, i) for i, s in enumerate(sample) if s == s and s != float("-inf")), reverse=True)[:k]
        for slot, (s, i) in enumerate(ranked):
            positions[b, slot], values[b, slot] = i, s
    return positions, values


def cosine_scores(target: torch.Tensor, vectors: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    sample = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    t = torch.nn.functional.normalize(target.double(), dim=-1, eps=1e-12)[sample]
    v = torch.nn.functional.normalize(vectors.double(), dim=-1, eps=1e-12)
    return (t * v).sum(-1).float()


# ---------------------------------------------------------------- reference semantics


def test_reference_cosine_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    offsets = offsets_from([5, 0, 1, 12])
    table = torch.randn(20, 8, generator=g)
    ids = torch.randint(0, 20, (18,), generator=g)
    target = torch.randn(4, 8, generator=g)
    pos, score = gsu_topk(offsets, 6, mode="cosine", target=target, behavior_ids=ids, table=table, backend="reference")
    want_pos, want_score = brute_force(cosine_scores(target, table[ids], offsets), offsets, 6)
    assert torch.equal(pos, want_pos)
    torch.testing.assert_close(score, want_score, rtol=1e-6, atol=1e-6)


def test_reference_ties_go_to_the_most_recent():
    # Every behavior of sample 0 is the same item: all scores tie, so the newest K win, newest first.
    offsets = offsets_from([6, 3])
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 0, 0, 0, 0, 1, 0, 1])
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos, score = gsu_topk(offsets, 4, mode="dot", target=target, behavior_ids=ids, table=table, backend="reference")
    assert pos.tolist() == [[5, 4, 3, 2], [2, 0, 1, -1]]
    assert score.tolist() == [[1.0] * 4, [2.0, 2.0, 0.0, 0.0]]


@pytest.mark.parametrize("seed", range(4))
def test_reference_selection_with_heavy_ties_matches_brute_force(seed):
    """Scores from a few levels (most behaviors tie) and excluded ones: the K-th-score selection keeps exactly the
    brute-force order (score, then the newer position)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 40, (9,), generator=g).tolist() + [0, 3]
    offsets = offsets_from(lengths)
    levels = torch.tensor([float("-inf"), -0.5, 0.0, 0.25, 1.0])
    scores = levels[torch.randint(0, 5, (int(offsets[-1]),), generator=g)]
    for k in (1, 2, 5, 17, 64):
        sample = torch.repeat_interleave(torch.arange(len(lengths)), offsets.diff())
        position = torch.arange(int(offsets[-1])) - offsets[sample]
        padded = torch.full((len(lengths), max(max(lengths), k)), float("-inf"))
        padded[sample, position] = scores
        pos, score = topk_newest_first(padded, k)
        want_pos, want_score = brute_force(scores, offsets, k)
        assert torch.equal(pos, want_pos), k
        assert torch.equal(score, want_score), k
        # the jagged path (a sort of the real behaviors, no padding) gives the same
        pos, score = jagged_topk_newest_first(scores, offsets, k)
        assert torch.equal(pos, want_pos), k
        assert torch.equal(score, want_score), k


def test_jagged_and_padded_paths_agree_on_signed_zeros_and_skew():
    """One long history among short ones takes the jagged path; -0.0 ties with 0.0 (newest first) on both."""
    from kernels.reference.gsu_topk import JAGGED_WHEN, gsu_topk_reference

    g = torch.Generator().manual_seed(3)
    lengths = [5000] + torch.randint(0, 6, (300,), generator=g).tolist()
    offsets = offsets_from(lengths)
    levels = torch.tensor([-0.0, 0.0, 0.5, -1.0, float("-inf"), float("nan")])
    vectors = levels[torch.randint(0, 6, (int(offsets[-1]),), generator=g)].unsqueeze(1)
    target = torch.ones(len(lengths), 1)
    assert len(lengths) * 5000 > JAGGED_WHEN * int(offsets[-1])  # this batch takes the jagged path
    for k in (1, 3, 50):
        pos, score = gsu_topk_reference(offsets, k, "dot", target, None, vectors)
        clean = torch.where(torch.isnan(vectors[:, 0]), float("-inf"), vectors[:, 0])
        want_pos, want_score = brute_force(clean, offsets, k)
        assert torch.equal(pos, want_pos) and torch.equal(score, want_score), k


def test_reference_category_keeps_the_newest_matches():
    offsets = offsets_from([7, 0, 2])
    cats = torch.tensor([3, 1, 3, 3, 2, 3, 1, 5, 5])
    pos, score = gsu_topk(
        offsets,
        3,
        mode="category",
        target_category=torch.tensor([3, 3, 4]),
        behavior_category=cats,
        backend="reference",
    )
    assert pos.tolist() == [[5, 3, 2], [-1, -1, -1], [-1, -1, -1]]
    assert score.tolist() == [[1.0, 1.0, 1.0], [0.0] * 3, [0.0] * 3]


def test_reference_int8_scales_and_zero_vectors():
    g = torch.Generator().manual_seed(1)
    offsets = offsets_from([9])
    table = torch.randint(-100, 100, (9, 16), generator=g, dtype=torch.int8)
    table[4] = 0  # an item without multimodal coverage
    row_scale = torch.rand(9, generator=g) + 0.1
    target = torch.randn(1, 16, generator=g)
    ids = torch.arange(9)
    common = {"mode": "cosine", "target": target, "behavior_ids": ids, "table": table, "backend": "reference"}
    plain = gsu_topk(offsets, 9, **common)
    # A positive scale, global or per row, does not change a cosine.
    for scale in (0.02, row_scale):
        scaled = gsu_topk(offsets, 9, scale=scale, **common)
        assert torch.equal(scaled[0], plain[0])
        torch.testing.assert_close(scaled[1], plain[1])
    assert 4 in plain[0][0].tolist() and plain[1][0][plain[0][0] == 4].item() == 0.0
    low = gsu_topk(offsets, 9, zero_vector_score=-1.1, **common)
    assert low[0][0, -1].item() == 4 and low[1][0, -1].item() == pytest.approx(-1.1)
    # The dot product does see a per-row scale.
    dot = gsu_topk(offsets, 9, mode="dot", target=target, behavior_ids=ids, table=table, scale=row_scale)
    want = (table.float() * row_scale[:, None]) @ target[0]
    assert torch.equal(dot[0][0], brute_force(want, offsets, 9)[0][0])


@pytest.mark.parametrize("mode", ["dot", "cosine"])
@pytest.mark.parametrize("source", ["table", "big_table", "jagged"])
@pytest.mark.parametrize("lengths", [[5, 0, 1, 12, 3], [900, 0, 300, 1], []])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8])
@pytest.mark.parametrize("scale", [None, 0.5, -2.0, "rows"])
def test_cpu_scores_equal_the_reference(mode, source, lengths, dtype, scale):
    """The CPU organization of the scores (table x targets, one mv per long sample, or the vectorized form) gives
    the readable reference's scores: every path, dtype, scale and empty samples; zero vectors under cosine."""
    from kernels.reference.gsu_topk import SEGMENT_MIN_WORK, gsu_scores_cpu, gsu_scores_reference

    g = torch.Generator().manual_seed(len(lengths) + len(str(scale)))
    offsets = offsets_from(lengths)
    total, batch, dim = int(offsets[-1]), len(lengths), 32
    rows = 4 if source == "table" else (total + 1) * dim + 64  # big_table: N·B > total·D, the gather path
    n = total if source == "jagged" else rows
    vectors = (torch.randn(n, dim, generator=g) * 50).to(dtype) if dtype != torch.int8 else None
    if vectors is None:
        vectors = torch.randint(-100, 100, (n, dim), generator=g, dtype=torch.int8)
    if n > 2:
        vectors[1] = 0  # a zero vector (an item without coverage)
    ids = torch.randint(0, n, (total,), generator=g) if source != "jagged" else None
    if ids is not None and total > 0:
        ids[0] = 1
    target = torch.randn(batch, dim, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    scale_t = None
    if scale == "rows":
        scale_t = torch.rand(n, generator=g) + 0.1
    elif scale is not None:
        scale_t = torch.tensor([scale])
    args = (offsets, mode, target, ids, vectors, scale_t, scale == "rows")
    for zero in [None, -1.1] if mode == "cosine" else [None]:
        want = gsu_scores_reference(*args, zero_vector_score=zero)
        got = gsu_scores_cpu(*args, zero_vector_score=zero)
        assert got.dtype == torch.float32 and got.shape == (total,)
        if mode == "dot":  # float32 sums in another order: the error bound scales with Σ |t_d e_d|, not with the sum
            mags = (offsets, mode, target.abs(), ids, vectors.abs(), None if scale_t is None else scale_t.abs())
            bound = 1e-6 * gsu_scores_reference(*mags, scale == "rows").double() + 1e-6
            assert ((got.double() - want.double()).abs() <= bound).all()
        else:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    if lengths and lengths[0] == 900:  # the long batch runs one mv per sample
        assert total * dim >= SEGMENT_MIN_WORK * batch


def test_cpu_scores_serve_auto_and_the_reference_serves_by_name(monkeypatch):
    """On the CPU the dispatcher scores with `gsu_scores_cpu` unless the readable reference is asked for by name."""
    import kernels.reference.gsu_topk as ref

    calls = []
    real = ref.gsu_scores_cpu
    monkeypatch.setattr(ref, "gsu_scores_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    offsets, vectors, target = offsets_from([3]), torch.randn(3, 2), torch.randn(1, 2)
    auto = gsu_topk(offsets, 2, mode="dot", target=target, behavior_vectors=vectors)
    assert calls == [1]
    named = gsu_topk(offsets, 2, mode="dot", target=target, behavior_vectors=vectors, backend="reference")
    assert calls == [1] and torch.equal(auto[0], named[0])


def test_reference_k_larger_than_every_sample_and_k_zero():
    offsets = offsets_from([0, 1, 2])
    vectors = torch.tensor([[1.0], [1.0], [2.0]])
    target = torch.ones(3, 1)
    pos, score = gsu_topk(offsets, 300, mode="dot", target=target, behavior_vectors=vectors, backend="reference")
    assert pos.shape == (3, 300) and score.dtype == torch.float32
    assert pos[:, :3].tolist() == [[-1, -1, -1], [0, -1, -1], [1, 0, -1]]
    assert (pos[:, 3:] == -1).all()
    empty = gsu_topk(offsets, 0, mode="dot", target=target, behavior_vectors=vectors)
    assert empty[0].shape == (3, 0)


def test_validation_errors():
    offsets = offsets_from([2])
    with pytest.raises(ValueError, match="mode"):
        gsu_topk(offsets, 1, mode="l2")
    with pytest.raises(ValueError, match="exactly one"):
        gsu_topk(offsets, 1, target=torch.ones(1, 2))
    with pytest.raises(ValueError, match="D="):
        gsu_topk(offsets, 1, target=torch.ones(1, 3), behavior_vectors=torch.ones(2, 2))
    with pytest.raises(ValueError, match="offsets"):
        gsu_topk(offsets_from([3]), 1, target=torch.ones(1, 2), behavior_vectors=torch.ones(2, 2))
    with pytest.raises(ValueError, match="int64"):
        gsu_topk(offsets.int(), 1, target=torch.ones(1, 2), behavior_vectors=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"behavior_ids must be in \[0, 4\)"):
        gsu_topk(offsets, 1, target=torch.ones(1, 2), behavior_ids=torch.tensor([0, 4]), table=torch.ones(4, 2))
    with pytest.raises(ValueError, match="category mode needs"):
        gsu_topk(offsets, 1, mode="category", target_category=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="k must be"):
        gsu_topk(offsets, -1, target=torch.ones(1, 2), behavior_vectors=torch.ones(2, 2))


# ---------------------------------------------------------------- Triton against the reference


def both(offsets: torch.Tensor, k: int, exact: bool = True, **kwargs) -> None:
    """Positions must agree exactly; scores bit for bit when the arithmetic is exact (small integers, float64),
    else to float32 rounding (the summation order differs)."""
    want = gsu_topk(offsets, k, backend="reference", **kwargs)
    got = gsu_topk(offsets, k, backend="triton", **kwargs)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    if exact:
        assert torch.equal(got[1], want[1]), (got[1], want[1])
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


lengths_st = st.lists(st.sampled_from([0, 1, 2, 5, 16, 17, 33, 50]), min_size=1, max_size=3)


@requires_triton
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=lengths_st,
    k=st.sampled_from([1, 3, 8, 16]),
    mode=st.sampled_from(["cosine", "dot", "category"]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.int8]),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(lengths, k, mode, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_from(lengths)
    total, batch, dim = sum(lengths), len(lengths), 5
    if mode == "category":
        cats = torch.randint(0, 3, (total,), generator=g)
        both(offsets, k, mode=mode, target_category=torch.randint(0, 3, (batch,), generator=g), behavior_category=cats)
        return
    # Small integers: many exact ties (recency decides), and exact arithmetic in every dtype.
    table = torch.randint(-2, 3, (13, dim), generator=g).to(dtype)
    target = torch.randint(-2, 3, (batch, dim), generator=g).double()
    ids = torch.randint(0, 13, (total,), generator=g, dtype=torch.int32)
    both(offsets, k, mode=mode, target=target, behavior_ids=ids, table=table)


@requires_triton
def test_triton_random_float64_cosine_with_row_scales_and_jagged_vectors():
    g = torch.Generator().manual_seed(7)
    offsets = offsets_from([40, 3, 0])
    vectors = torch.randn(43, 24, dtype=torch.float64, generator=g)
    vectors[5] = 0
    target = torch.randn(3, 24, dtype=torch.float64, generator=g)
    scale = torch.rand(43, dtype=torch.float64, generator=g) + 0.5
    both(offsets, 7, mode="cosine", target=target, behavior_vectors=vectors, scale=scale, zero_vector_score=-1.1)


@requires_triton
def test_triton_int8_table_with_global_scale_dot():
    g = torch.Generator().manual_seed(3)
    offsets = offsets_from([37, 21])
    table = torch.randint(-128, 128, (50, 32), generator=g, dtype=torch.int8)
    ids = torch.randint(0, 50, (58,), generator=g)
    target = torch.randn(2, 32, generator=g)
    both(offsets, 5, exact=False, mode="dot", target=target, behavior_ids=ids, table=table, scale=0.0125)


@requires_triton
def test_triton_k_larger_than_lengths_single_split():
    offsets = offsets_from([3, 0, 1])
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(4, 3, generator=g)
    target = torch.randn(3, 3, generator=g)
    both(offsets, 8, mode="dot", target=target, behavior_vectors=vectors)


def test_triton_falls_back_beyond_max_k(caplog):
    offsets = offsets_from([3])
    vectors = torch.eye(3)
    target = torch.ones(1, 3)
    with caplog.at_level("WARNING"):
        pos, _ = gsu_topk(offsets, 257, mode="dot", target=target, behavior_vectors=vectors, backend="triton")
    assert pos[0, :3].tolist() == [2, 1, 0]
    assert "k=257" in caplog.text
