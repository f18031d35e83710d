"""target_attention: the reference against a per-sample softmax, gradcheck, and Triton against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import target_attention
from kernels._backend import triton_available
from kernels.triton import config

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton does not import")


def offsets_from(lengths: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets


def make_inputs(lengths, n_query, n_head, dk, dv, dtype, seed, bias="none", temperature=False, masked=False):
    g = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    inputs = {
        "query": rand(batch, n_query, n_head, dk),
        "keys": rand(total, n_head, dk),
        "values": rand(total, n_head, dv),
        "offsets": offsets_from(lengths),
        "bias": None,
        "temperature": None,
        "mask": torch.rand(total, generator=g) > 0.3 if masked else None,
    }
    if bias == "shared":
        inputs["bias"] = rand(total)
    elif bias == "per_query":
        inputs["bias"] = rand(total, n_query)
    if temperature:
        tau = torch.rand(batch, generator=g, dtype=torch.float64) + 0.5
        inputs["temperature"] = tau.to(dtype).requires_grad_()
    return inputs


def per_sample_loop(query, keys, values, offsets, bias=None, temperature=None, mask=None, scale=1.0):
    """The definition, one sample at a time with torch.softmax."""
    if mask is not None:  # a masked-out behavior is an absent one
        lengths = [int(mask[offsets[b] : offsets[b + 1]].sum()) for b in range(offsets.numel() - 1)]
        keys, values, offsets = keys[mask], values[mask], offsets_from(lengths)
        bias = bias[mask] if bias is not None else None
    outs = []
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        if hi == lo:
            outs.append(torch.zeros(query.shape[1], query.shape[2], values.shape[-1], dtype=query.dtype))
            continue
        logits = torch.einsum("qhd,lhd->qhl", query[b], keys[lo:hi]) * scale
        if bias is not None:
            logits = logits + (bias[lo:hi][None, None, :] if bias.dim() == 1 else bias[lo:hi].T[:, None, :])
        if temperature is not None:
            logits = logits / temperature[b]
        outs.append(torch.einsum("qhl,lhd->qhd", torch.softmax(logits, -1), values[lo:hi]))
    return torch.stack(outs)


def run(inputs, backend, grad_seed=1, **kwargs):
    out = target_attention(
        inputs["query"],
        inputs["keys"],
        inputs["values"],
        inputs["offsets"],
        bias=inputs["bias"],
        temperature=inputs["temperature"],
        mask=inputs["mask"],
        backend=backend,
        **kwargs,
    )
    wrt = [t for t in (inputs[n] for n in ("query", "keys", "values", "bias", "temperature")) if t is not None]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, wrt, g.to(out.dtype))
    return out, grads


# ---------------------------------------------------------------- reference


def test_reference_matches_per_sample_softmax():
    inputs = make_inputs([3, 0, 1, 6], 2, 2, 4, 3, torch.float64, seed=0, bias="per_query", temperature=True)
    got = target_attention(
        inputs["query"],
        inputs["keys"],
        inputs["values"],
        inputs["offsets"],
        bias=inputs["bias"],
        temperature=inputs["temperature"],
        backend="reference",
    )
    want = per_sample_loop(**inputs, scale=0.5)
    torch.testing.assert_close(got, want)
    assert (got[1] == 0).all()


def test_reference_mask_drops_behaviors():
    inputs = make_inputs([4, 3, 2], 2, 2, 4, 3, torch.float64, seed=8, bias="per_query", temperature=True)
    inputs["mask"] = torch.tensor([True, False, True, True, False, False, False, True, False])
    out, grads = run(inputs, "reference", scale=0.5)
    torch.testing.assert_close(out, per_sample_loop(**inputs, scale=0.5))
    assert (out[1] == 0).all()  # every behavior of sample 1 masked out
    dropped = ~inputs["mask"]
    for grad in grads[1:4]:  # keys, values, bias: zero on the dropped rows
        assert (grad[dropped] == 0).all()


def test_reference_gradcheck():
    inputs = make_inputs([2, 0, 3], 2, 1, 3, 2, torch.float64, seed=1, bias="shared", temperature=True)

    def fn(q, k, v, bias, tau):
        return target_attention(q, k, v, inputs["offsets"], bias=bias, temperature=tau, backend="reference")

    args = [inputs[n] for n in ("query", "keys", "values", "bias", "temperature")]
    assert torch.autograd.gradcheck(fn, args)


def test_three_dim_form_equals_one_head():
    inputs = make_inputs([4, 2], 3, 1, 5, 5, torch.float64, seed=2)
    four = target_attention(inputs["query"], inputs["keys"], inputs["values"], inputs["offsets"])
    three = target_attention(
        inputs["query"][:, :, 0], inputs["keys"][:, 0], inputs["values"][:, 0], inputs["offsets"], scale=None
    )
    torch.testing.assert_close(three, four[:, :, 0])


def test_validation_errors():
    inputs = make_inputs([2], 1, 1, 4, 4, torch.float64, seed=3)
    q, k, v, off = inputs["query"], inputs["keys"], inputs["values"], inputs["offsets"]
    with pytest.raises(ValueError, match="dtype"):
        target_attention(q, k.float(), v, off)
    with pytest.raises(ValueError, match="bias"):
        target_attention(q, k, v, off, bias=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        target_attention(q, k, v, off, temperature=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        target_attention(q, k, v, off, mask=torch.ones(2))
    with pytest.raises(ValueError, match="finite"):
        target_attention(q, k, v, off, bias=torch.tensor([0.0, float("-inf")], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        target_attention(q, k, v, off, temperature=torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device"):
        target_attention(q, k, v, off, bias=torch.zeros(2, dtype=torch.float64, device="meta"), max_len=2)
    with pytest.raises(ValueError, match="offsets"):
        target_attention(q, k, v, torch.tensor([0, 3]))


# ---------------------------------------------------------------- Triton against the reference


def assert_parity(inputs, atol=1e-10, rtol=1e-8, **kwargs):
    out_ref, grads_ref = run(inputs, "reference", **kwargs)
    out_tri, grads_tri = run(inputs, "triton", **kwargs)
    torch.testing.assert_close(out_tri, out_ref, atol=atol, rtol=rtol)
    for got, want in zip(grads_tri, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@requires_triton
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.sampled_from([0, 1, 2, 15, 16, 17, 40]), min_size=1, max_size=3),
    n_query=st.sampled_from([1, 3]),
    n_head=st.sampled_from([1, 2]),
    dk=st.sampled_from([3, 8]),
    dv=st.sampled_from([2, 8]),
    bias=st.sampled_from(["none", "shared", "per_query"]),
    temperature=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_float64(lengths, n_query, n_head, dk, dv, bias, temperature, masked, seed):
    inputs = make_inputs(lengths, n_query, n_head, dk, dv, torch.float64, seed, bias, temperature, masked)
    assert_parity(inputs)


@requires_triton
def test_triton_tensor_core_path_float64():
    inputs = make_inputs([17, 0, 5], 2, 2, 16, 16, torch.float64, seed=4, bias="per_query", temperature=True)
    with config.override(use_dot=True):
        assert_parity(inputs, scale=1.0)


@requires_triton
def test_triton_empty_samples_give_zero_output_and_gradients():
    inputs = make_inputs([0, 3, 0], 1, 1, 4, 4, torch.float64, seed=5, bias="shared", temperature=True)
    out, grads = run(inputs, "triton")
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert (grads[0][0] == 0).all() and (grads[0][2] == 0).all() and grads[4][0] == 0


@requires_triton
def test_triton_fully_masked_tiles_and_samples():
    # 16-row tiles: sample 0 has a whole tile masked before and after live rows, sample 1 is masked out entirely.
    inputs = make_inputs([40, 5], 2, 1, 4, 4, torch.float64, seed=9, bias="shared", temperature=True)
    mask = torch.zeros(45, dtype=torch.bool)
    mask[16:20] = True
    inputs["mask"] = mask
    assert_parity(inputs)
    out, grads = run(inputs, "triton")
    assert (out[1] == 0).all() and (grads[1][~mask] == 0).all() and (grads[2][~mask] == 0).all()


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision(dtype):
    inputs = make_inputs([9, 1, 20], 2, 2, 8, 8, dtype, seed=6, bias="shared")
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert_parity(inputs, **tol)


@requires_triton
def test_triton_large_query_count_falls_back(caplog):
    inputs = make_inputs([2], 65, 1, 4, 4, torch.float64, seed=7)
    with caplog.at_level("WARNING"):
        assert_parity(inputs)
    assert "65 queries" in caplog.text
