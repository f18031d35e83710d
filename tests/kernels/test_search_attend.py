"""`kernels.search_attend`: the fused GSU -> ESU against a per-sample loop (reference) and the Triton kernel against
the reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from kernels import gsu_topk, search_attend
from kernels._backend import triton_available

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton does not import")


def offsets_of(lengths):
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets


def make(lengths, n_query, n_head, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), sum(lengths)
    f64 = {"generator": gen, "dtype": torch.float64}
    inp = {
        "offsets": offsets_of(lengths),
        "query": torch.randn(batch, n_query, n_head, 8, **f64).requires_grad_(),
        "keys": torch.randn(total, n_head, 8, **f64).requires_grad_(),
        "values": torch.randn(total, n_head, 4, **f64).requires_grad_(),
        "bias": torch.randn(total, **f64).requires_grad_(),
        "temperature": (torch.rand(batch, **f64) + 0.5).requires_grad_(),
    }
    search = {"mode": mode}
    if mode == "category":
        search["target_category"] = torch.randint(0, 3, (batch,), generator=gen)
        search["behavior_category"] = torch.randint(0, 3, (total,), generator=gen)
    elif mode == "cosine":
        search["target"] = torch.randn(batch, 6, **f64)
        search["table"] = torch.randn(40, 6, **f64)
        search["behavior_ids"] = torch.randint(0, 40, (total,), generator=gen)
    else:
        search["target"] = torch.randn(batch, 6, **f64)
        search["behavior_vectors"] = torch.randn(total, 6, **f64)
    return inp, search


LEAVES = ("query", "keys", "values", "bias", "temperature")


def run(inp, search, k, backend, max_len=None):
    for name in LEAVES:
        inp[name].grad = None
    res = search_attend(
        inp["offsets"], k, inp["query"], inp["keys"], inp["values"], bias=inp["bias"],
        temperature=inp["temperature"], max_len=max_len, backend=backend, **search,
    )  # fmt: skip
    res.out.backward(torch.linspace(-1, 1, res.out.numel(), dtype=res.out.dtype).reshape(res.out.shape))
    return res, [inp[name].grad.clone() for name in LEAVES]


def test_reference_is_attention_over_the_selected_behaviors():
    inp, search = make([9, 0, 3, 14], 2, 2, "dot", seed=0)
    k = 5
    res, _ = run(inp, search, k, "reference")
    positions, scores = gsu_topk(inp["offsets"], k, backend="reference", **search)
    assert torch.equal(res.positions, positions) and torch.equal(res.scores, scores)
    q, keys, values = inp["query"].detach(), inp["keys"].detach(), inp["values"].detach()
    bias, tau = inp["bias"].detach(), inp["temperature"].detach()
    for b in range(len(inp["offsets"]) - 1):
        sel = positions[b][positions[b] >= 0] + inp["offsets"][b]
        if sel.numel() == 0:
            assert (res.out[b] == 0).all()
            continue
        logits = torch.einsum("qhd,khd->qhk", q[b], keys[sel]) / 8**0.5 + bias[sel]
        weights = torch.softmax(logits / tau[b], dim=-1)
        torch.testing.assert_close(res.out[b].detach(), torch.einsum("qhk,khd->qhd", weights, values[sel]))


@requires_triton
@pytest.mark.parametrize("mode", ["dot", "cosine", "category"])
@pytest.mark.parametrize(("n_query", "n_head"), [(1, 1), (3, 2)])
@pytest.mark.parametrize("k", [1, 4, 20])
def test_triton_matches_reference(mode, n_query, n_head, k):
    inp, search = make([40, 0, 3, 17, 1], n_query, n_head, mode, seed=k)
    want, want_grads = run(inp, search, k, "reference")
    got, got_grads = run(inp, search, k, "triton", max_len=40)
    assert torch.equal(got.positions, want.positions)
    torch.testing.assert_close(got.out, want.out, atol=1e-10, rtol=1e-8)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)
    selected = torch.zeros(inp["keys"].shape[0], dtype=torch.bool)
    rows = (inp["offsets"][:-1, None] + got.positions.clamp_min(0))[got.positions >= 0]
    selected[rows] = True
    assert (got_grads[1][~selected] == 0).all() and (got_grads[2][~selected] == 0).all()  # unselected rows


@requires_triton
def test_two_dim_keys_and_no_candidates():
    inp, search = make([6, 2], 1, 1, "category", seed=3)
    search["target_category"] = torch.tensor([7, 7])  # no behavior has category 7
    res = search_attend(
        inp["offsets"], 4, inp["query"][:, :, 0], inp["keys"][:, 0], inp["values"][:, 0], backend="triton", **search
    )
    assert res.out.shape == (2, 1, 4) and (res.out == 0).all() and (res.positions == -1).all()


@requires_triton
@pytest.mark.parametrize(("n_query", "n_head"), [(1, 1), (2, 2)])
def test_side_table_columns(n_query, n_head):
    """Keys and values extended by a side table read per behavior (SIM's time-gap embedding): Triton against the
    reference, forward and every gradient, the table's included."""
    inp, search = make([40, 0, 3, 17, 1], n_query, n_head, "dot", seed=11)
    gen = torch.Generator().manual_seed(5)
    total = inp["keys"].shape[0]
    side_ids = torch.randint(0, 6, (total,), generator=gen)
    table = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    query = torch.randn(5, n_query, n_head, 8 + 3, generator=gen, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in ("reference", "triton"):
        leaves = [query, inp["keys"], inp["values"], table]
        for t in leaves:
            t.grad = None
        res = search_attend(
            inp["offsets"], 7, query, inp["keys"], inp["values"], side_ids=side_ids, side_table=table,
            backend=backend, **search,
        )  # fmt: skip
        assert res.out.shape == (5, n_query, n_head, 4 + 3)
        res.out.backward(torch.linspace(-1, 1, res.out.numel(), dtype=res.out.dtype).reshape(res.out.shape))
        results.append([res.out.detach()] + [t.grad.clone() for t in leaves])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    assert results[1][4].abs().sum() > 0  # the table does get a gradient
