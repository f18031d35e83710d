"""Cases at the shipped launch settings (no tile override), shared by `test_cuda.py` (on a GPU, lengths up to 100K)
and `test_shipped_settings.py` (in the interpreter, in CI, shorter lengths).

Every case runs the Triton kernel and the PyTorch reference on the same inputs, forward and backward, and compares:
outputs and gradients within a tolerance relative to the largest reference value (16-bit inputs use tensor cores
with float32 accumulation, the reference computes in float32), GSU selections by the reference's own scores at the
selected positions (near-ties may order differently when the scores are summed in another order). Values that are
zero in exact arithmetic (the output bias's gradient under a softmax) are compared against a floor of 1e-2.

Batches: one longest sample, an empty one, a one-behavior one, a fully masked one (target attention, DIN) and a few
in between, so that a sample spans many work items while others have none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels import din_attention, gsu_topk, target_attention
from kernels.reference.gsu_topk import gsu_scores_reference

REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float64: 1e-9}


def batch_lengths(longest: int) -> list[int]:
    return [longest, 0, 1, 777, longest // 3, 250, 64, 5]


def offsets_of(lengths: list[int], device: torch.device) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets.to(device)


def assert_near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got, want = got.float(), want.float()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= REL_TOL[dtype] * max(scale, 1e-2), f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def _grad_seed(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)


def both_backends(call: Callable[[str], torch.Tensor], leaves: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``[reference, triton]``: each backend's output (``call(backend)``, then backward from a fixed seed) followed
    by the gradients of ``leaves``."""
    results = []
    for backend in ("reference", "triton"):
        for t in leaves:
            t.grad = None
        out = call(backend)
        out.backward(_grad_seed(out))
        results.append([out.detach()] + [t.grad.detach().clone() for t in leaves])
    return results


def check_target_attention(
    device: torch.device, dtype: torch.dtype, dim: int, n_query: int, n_head: int, longest: int, seed: int = 0
) -> None:
    """Bias, temperature, a partially and a fully masked sample; forward and every gradient against the reference."""
    lengths = batch_lengths(longest)
    gen = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), sum(lengths)
    offsets = offsets_of(lengths, device)

    def rand(*shape: int, low: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) + low).to(device)

    query = rand(batch, n_query, n_head, dim).to(dtype)
    keys = rand(total, n_head, dim).to(dtype)
    values = rand(total, n_head, dim).to(dtype)
    bias = rand(total)
    temperature = (torch.rand(batch, generator=gen) + 0.5).to(device)
    mask = torch.ones(total, dtype=torch.bool)
    mask[: longest // 2 : 7] = False  # some behaviors of the longest sample
    masked = sum(lengths[:3])
    mask[masked : masked + lengths[3]] = False  # the 777-long sample, entirely
    mask = mask.to(device)
    leaves = [t.requires_grad_() for t in (query, keys, values, bias, temperature)]
    results = both_backends(
        lambda backend: target_attention(
            query, keys, values, offsets, bias=bias, temperature=temperature, mask=mask, max_len=longest,
            backend=backend,
        ),
        leaves,
    )  # fmt: skip
    names = ["out", "dquery", "dkeys", "dvalues", "dbias", "dtemperature"]
    for name, got, want in zip(names, results[1], results[0], strict=True):
        assert_near(got, want, dtype, f"target_attention D={dim} Q={n_query} H={n_head} {name}")
    assert (results[1][0][3] == 0).all(), "a fully masked sample must give zeros"


def check_gsu_topk(
    device: torch.device, dtype: torch.dtype, dim: int, k: int, longest: int, mode: str, seed: int = 0
) -> None:
    """Cosine over a table gathered by ids (MUSE), dot over jagged vectors (SIM soft), or category match (SIM hard)."""
    lengths = batch_lengths(longest)
    gen = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), sum(lengths)
    offsets = offsets_of(lengths, device)
    kwargs: dict = {}
    if mode == "category":
        kwargs["target_category"] = torch.randint(0, 20, (batch,), generator=gen).to(device)
        kwargs["behavior_category"] = torch.randint(0, 20, (total,), generator=gen).to(device)
    else:
        kwargs["target"] = torch.randn(batch, dim, generator=gen).to(device, dtype)
        if mode == "cosine":
            kwargs["table"] = torch.randn(50_000, dim, generator=gen).to(device, dtype)
            kwargs["behavior_ids"] = torch.randint(0, 50_000, (total,), generator=gen).to(device)
        else:
            kwargs["behavior_vectors"] = torch.randn(total, dim, generator=gen).to(device, dtype)
    got_pos, got_score = gsu_topk(offsets, k, mode=mode, max_len=longest, backend="triton", **kwargs)
    want_pos, want_score = gsu_topk(offsets, k, mode=mode, backend="reference", **kwargs)
    what = f"gsu_topk {mode} D={dim} K={k} {dtype}"
    assert torch.equal(got_pos < 0, want_pos < 0), f"{what}: different numbers of candidates"
    ref = {key: kwargs.get(key) for key in ("target", "behavior_ids", "target_category", "behavior_category")}
    vectors = kwargs.get("table", kwargs.get("behavior_vectors"))
    all_scores = gsu_scores_reference(offsets, mode, vectors=vectors, **ref)
    starts = offsets[:-1, None].expand_as(got_pos)
    rescored = torch.where(got_pos >= 0, all_scores[(starts + got_pos.clamp_min(0)).clamp_max(total - 1)], 0.0)
    assert_near(rescored.sort(1, descending=True).values, want_score.sort(1, descending=True).values, dtype, what)
    assert_near(got_score, want_score, dtype, what + " scores")
    for b in range(batch):  # the selected positions are distinct and inside the sample
        sel = got_pos[b][got_pos[b] >= 0]
        assert sel.unique().numel() == sel.numel() and (sel < lengths[b]).all(), f"{what}: sample {b}"


def check_din_attention(
    device: torch.device, dtype: torch.dtype, dim: int, softmax: bool, activation: str, longest: int, seed: int = 0
) -> None:
    """DIN's shipped unit [4D -> 80 -> 40 -> 1], a fully masked sample; forward and gradients."""
    lengths = batch_lengths(longest)
    gen = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), sum(lengths)
    offsets = offsets_of(lengths, device)
    query = torch.randn(batch, dim, generator=gen).to(device, dtype)
    keys = torch.randn(total, dim, generator=gen).to(device, dtype)
    widths = [4 * dim, 80, 40, 1]
    weights = [(torch.randn(a, b, generator=gen) / a**0.5).to(device) for a, b in zip(widths, widths[1:], strict=False)]
    biases = [(0.1 * torch.randn(b, generator=gen)).to(device) for b in widths[1:]]
    alphas = [torch.full((w,), 0.25).to(device) for w in widths[1:-1]] if activation == "prelu" else None
    mask = torch.ones(total, dtype=torch.bool)
    masked = sum(lengths[:3])
    mask[masked : masked + lengths[3]] = False
    mask = mask.to(device)
    leaves = [query, keys, *weights, *biases] + (alphas or [])
    for t in leaves:
        t.requires_grad_()
    results = both_backends(
        lambda backend: din_attention(
            query, keys, offsets, weights, biases, activation=activation, alphas=alphas, softmax=softmax,
            softmax_scale=dim**-0.5, mask=mask, max_len=longest, backend=backend,
        ),
        leaves,
    )  # fmt: skip
    for i, (got, want) in enumerate(zip(results[1], results[0], strict=True)):
        assert_near(got, want, dtype, f"din_attention D={dim} softmax={softmax} {activation} tensor {i}")


def check_search_attend(
    device: torch.device, dtype: torch.dtype, dim: int, k: int, n_query: int, longest: int, seed: int = 0
) -> None:
    """The fused GSU -> ESU: top-K by category match (exact scores, recency order: both backends select the same
    behaviors; the dot-product search is `check_gsu_topk`'s), then attention over the K selected with a time-gap
    side table (32 rows x 16, as SIM's ESU); forward and every gradient, the table's included."""
    from kernels import search_attend

    lengths = batch_lengths(longest)
    gen = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), sum(lengths)
    offsets = offsets_of(lengths, device)
    keys = torch.randn(total, dim, generator=gen).to(device, dtype).requires_grad_()
    table = torch.randn(32, 16, generator=gen).to(device, dtype).requires_grad_()
    query = torch.randn(batch, n_query, dim + 16, generator=gen).to(device, dtype).requires_grad_()
    search = {
        "mode": "category",
        "target_category": torch.randint(0, 20, (batch,), generator=gen).to(device),
        "behavior_category": torch.randint(0, 20, (total,), generator=gen).to(device),
        "side_ids": torch.randint(1, 32, (total,), generator=gen).to(device),
        "side_table": table,
    }
    positions = {}

    def call(backend: str) -> torch.Tensor:
        max_len = longest if backend == "triton" else None
        res = search_attend(offsets, k, query, keys, max_len=max_len, backend=backend, **search)
        positions[backend] = res.positions
        return res.out

    results = both_backends(call, [query, keys, table])
    what = f"search_attend D={dim} K={k} Q={n_query} {dtype}"
    assert torch.equal(positions["triton"], positions["reference"]), f"{what}: a different selection"
    for name, got, want in zip(["out", "dquery", "dkeys", "dtable"], results[1], results[0], strict=True):
        assert_near(got, want, dtype, f"{what} {name}")
