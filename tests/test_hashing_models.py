"""ETA and SDIM: their hashing blocks against brute force (ties included), and the models on real batches.

The model-level checks every two-stage model passes (loss decreases, selection inside the prefix, per-sample eval,
DARE tables) run for ETA and SDIM in tests/test_two_stage.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import batches, build, train_steps  # noqa: E402
from test_two_stage import brute_topk, random_lengths  # noqa: E402

from ctr.modules.gsu import lengths_to_offsets
from ctr.modules.hashing import SimHashBucketPool, SimHashGSU

pytestmark = pytest.mark.usefixtures("one_thread")


def _code(x: torch.Tensor, rotation: torch.Tensor) -> list[int]:
    """A vector's SimHash bits, one at a time (the definition: bit j = [x . r_j >= 0])."""
    return [int(float(x.double() @ rotation[:, j].double()) >= 0) for j in range(rotation.shape[1])]


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("bits", [4, 32])
def test_simhash_gsu_matches_brute_force(k, bits):
    """Top-K by Hamming distance, equal distances to the most recent; few bits make ties common."""
    gen = torch.Generator().manual_seed(7 * k + bits)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    gsu = SimHashGSU(6, hash_bits=bits, seed=k)
    target = torch.randn(len(lengths), 6, generator=gen)
    behaviors = torch.randn(int(offsets[-1]), 6, generator=gen)
    sel = gsu(offsets, target, behaviors, k)
    rot = gsu.rotation
    dist = [
        [sum(a != b for a, b in zip(_code(behaviors[offsets[s] + i], rot), _code(target[s], rot), strict=True))
         for i in range(n)]
        for s, n in enumerate(lengths)
    ]  # fmt: skip
    assert sel.positions.tolist() == brute_topk(lengths, [[-d for d in row] for row in dist], k)
    for s in range(len(lengths)):  # the reported scores are the Hamming distances of the slots
        real = sel.positions[s] >= 0
        want = [dist[s][int(p)] for p in sel.positions[s][real]]
        assert sel.scores[s][real].tolist() == want
    flat = torch.tensor([d for row in dist for d in row], dtype=torch.int64)
    assert torch.equal(gsu.hamming(target, behaviors, offsets), flat)


def test_simhash_is_fixed_and_saved():
    """The rotations come from the seed, are saved with the model and survive a reload."""
    a, b = SimHashGSU(8, 16, seed=3), SimHashGSU(8, 16, seed=3)
    assert torch.equal(a.rotation, b.rotation) and "rotation" in a.state_dict()
    assert not torch.equal(a.rotation, SimHashGSU(8, 16, seed=4).rotation)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_hashes, bits", [(1, 1), (2, 4), (3, 2)])
def test_bucket_pool_matches_brute_force(num_hashes, bits, normalize):
    gen = torch.Generator().manual_seed(num_hashes * 10 + bits)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    pool = SimHashBucketPool(5, num_hashes, bits, seed=1, normalize=normalize)
    target = torch.randn(len(lengths), 5, generator=gen)
    behaviors = torch.randn(int(offsets[-1]), 5, generator=gen)
    values = torch.randn(int(offsets[-1]), 3, generator=gen)
    got = pool(target, behaviors, offsets, values=values)
    for s, n in enumerate(lengths):
        per_hash = []
        for h in range(num_hashes):
            rot = pool.rotation[h]
            t = _code(target[s], rot)
            acc = torch.zeros(3, dtype=torch.float64)
            for i in range(n):
                if _code(behaviors[offsets[s] + i], rot) == t:
                    acc += values[offsets[s] + i].double()
            per_hash.append(acc / acc.norm().clamp(min=1e-12) if normalize else acc)
        torch.testing.assert_close(got[s].double(), torch.stack(per_hash).mean(0), rtol=1e-5, atol=1e-6)
    assert pool.buckets(behaviors).max() < 2**bits


def _hash_case(
    seed: int, empty: int, dim: int, num_hashes: int, bits: int, pool_seed: int, own: slice
) -> tuple[torch.Generator, SimHashBucketPool, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random jagged rows (sample `empty` without any) and targets for a bucket pool; the rows at `own` are copies of
    their sample's target. Returns the generator to draw more from, the pool, targets, rows and offsets."""
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(gen)
    lengths[empty] = 0
    offsets = lengths_to_offsets(torch.tensor(lengths))
    pool = SimHashBucketPool(dim, num_hashes, bits, seed=pool_seed)
    target = torch.randn(len(lengths), dim, generator=gen)
    rows = torch.randn(int(offsets[-1]), dim, generator=gen)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    rows[own] = target[sample[own]]
    return gen, pool, target, rows, offsets


@pytest.mark.parametrize("num_hashes, bits", [(1, 3), (2, 4), (4, 4), (3, 20), (5, 40)])
def test_bucket_pool_native_is_the_eager_form(num_hashes, bits):
    """The share of matching functions from `simhash.cpp` (each width of its register blocks) and the weighted pool
    after it: the eager codes' share, the same pooled values and gradients."""
    from ctr import native

    # half the behaviors are a target's own embedding: every function matches them
    gen, pool, target, behaviors, offsets = _hash_case(num_hashes + bits, 0, 37, num_hashes, bits, 2, slice(0, None, 2))
    values = torch.randn(int(offsets[-1]), 6, generator=gen)
    runs = []
    try:
        for on in (True, False):
            native.set_enabled(on)
            v = values.clone().requires_grad_()
            share = pool.match_share(target, behaviors, offsets)
            out = pool(target, behaviors, offsets, values=v)
            (out * torch.linspace(-1, 1, 6)).sum().backward()
            runs.append((share, out.detach(), v.grad))
    finally:
        native.set_enabled(True)
    assert torch.equal(runs[0][0], runs[1][0]) and bool((runs[0][0][::2] == 1).all())
    for got, want in zip(runs[0][1:], runs[1][1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_hashes, bits", [(2, 4), (3, 20)])
def test_bucket_pool_native_pools_the_hashed_rows_themselves(num_hashes, bits):
    """SDIM without DARE hashes and pools the same rows (one tensor, with gradient): the fused native pass reads each
    row once and gives the eager form's pooled values and the rows' gradients (the hash has none)."""
    from ctr import native

    # a third of the rows are their target: every function matches them
    _, pool, target, rows, offsets = _hash_case(7 * num_hashes + bits, 1, 24, num_hashes, bits, 3, slice(1, None, 3))
    runs = []
    try:
        for on in (True, False):
            native.set_enabled(on)
            x = rows.clone().requires_grad_()
            out = pool(target, x, offsets)
            (out * torch.linspace(-1, 1, 24)).sum().backward()
            runs.append((out.detach(), x.grad))
    finally:
        native.set_enabled(True)
    for got, want in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(runs[0][1][1::3].abs().sum()) > 0  # the matching rows have a gradient


def test_bucket_pool_gradient_reaches_the_pooled_values():
    pool = SimHashBucketPool(4, 2, 2, seed=0)
    offsets = lengths_to_offsets(torch.tensor([3, 0, 5]))
    target, behaviors = torch.randn(3, 4), torch.randn(8, 4, requires_grad=True)
    pool(target, behaviors, offsets).sum().backward()
    assert behaviors.grad is not None and behaviors.grad.abs().sum() > 0


@pytest.mark.parametrize("name, params", [("eta", {"hash_bits": 8, "time_buckets": 0}), ("sdim", {"normalize": True})])
def test_variants_run(info, name, params):
    model = build(info, name, **params)
    losses = train_steps(model, batches(info, model, 3))
    assert all(math.isfinite(v) for v in losses)


def test_sdim_refuses_a_topk():
    from ctr.models import get_model_class

    with pytest.raises(ValueError, match="no top-K"):
        get_model_class("sdim").Params(k=50)
