"""din_attention: the reference against a per-sample MLP, gradcheck, and the fused Triton kernel against it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import din_attention
from kernels._backend import triton_available

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton does not import")


def offsets_from(lengths: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets


def make_inputs(lengths, dim, widths, activation, dtype, seed, values_dim=None, training=False, masked=False):
    g = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), sum(lengths)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    sizes = [4 * dim, *widths, 1]
    inputs = {
        "query": rand(batch, dim),
        "keys": rand(total, dim),
        "offsets": offsets_from(lengths),
        "weights": [rand(sizes[i], sizes[i + 1], scale=sizes[i] ** -0.5) for i in range(len(sizes) - 1)],
        "biases": [rand(sizes[i + 1], scale=0.1) for i in range(len(sizes) - 1)],
        "values": rand(total, values_dim) if values_dim else None,
        "activation": activation,
        "alphas": None,
        "dice_running": None,
        "dice_training": training,
        "mask": torch.rand(total, generator=g) > 0.3 if masked else None,
    }
    if activation in ("prelu", "dice"):
        inputs["alphas"] = [rand(w, scale=0.3) for w in widths]
    if activation == "dice":
        inputs["dice_running"] = [
            (torch.randn(w, generator=g, dtype=torch.float64), torch.rand(w, generator=g, dtype=torch.float64) + 0.5)
            for w in widths
        ]
    return inputs


def trainable(inputs):
    tensors = [inputs["query"], inputs["keys"]] + ([inputs["values"]] if inputs["values"] is not None else [])
    return tensors + inputs["weights"] + inputs["biases"] + (inputs["alphas"] or [])


def run(inputs, backend, **kwargs):
    out = din_attention(**inputs, backend=backend, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad(out, trainable(inputs), g)


def per_sample_loop(inputs, softmax=False, softmax_scale=1.0):
    """DIN's activation unit written plainly: one sample at a time, inference-mode statistics."""
    q, k, offsets = inputs["query"], inputs["keys"], inputs["offsets"]
    v = inputs["values"] if inputs["values"] is not None else k
    if inputs["mask"] is not None:  # a masked-out behavior is an absent one
        mask = inputs["mask"]
        lengths = [int(mask[offsets[b] : offsets[b + 1]].sum()) for b in range(offsets.numel() - 1)]
        k, v, offsets = k[mask], v[mask], offsets_from(lengths)
    outs = []
    for b in range(offsets.numel() - 1):
        kb = k[offsets[b] : offsets[b + 1]]
        qb = q[b].expand_as(kb)
        x = torch.cat([qb, kb, qb - kb, qb * kb], -1)
        for i, (w, bias) in enumerate(zip(inputs["weights"][:-1], inputs["biases"][:-1], strict=True)):
            x = x @ w + bias
            if inputs["activation"] == "sigmoid":
                x = torch.sigmoid(x)
            elif inputs["activation"] == "prelu":
                x = torch.nn.functional.prelu(x, inputs["alphas"][i])
            elif inputs["activation"] == "dice":
                mean, var = inputs["dice_running"][i]
                p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
                x = p * x + (1 - p) * inputs["alphas"][i] * x
            else:
                x = torch.relu(x)
        s = (x @ inputs["weights"][-1] + inputs["biases"][-1]).squeeze(-1)
        a = torch.softmax(s * softmax_scale, 0) if softmax else s
        outs.append((a[:, None] * v[offsets[b] : offsets[b + 1]]).sum(0, dtype=q.dtype))
    return torch.stack(outs)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice", "relu"])
@pytest.mark.parametrize("softmax", [False, True])
def test_reference_matches_per_sample_mlp(activation, softmax):
    inputs = make_inputs([3, 0, 1, 5], 4, [6, 3], activation, torch.float64, seed=0, values_dim=2)
    got = din_attention(**inputs, softmax=softmax, softmax_scale=0.5, backend="reference")
    torch.testing.assert_close(got, per_sample_loop(inputs, softmax, 0.5))
    assert (got[1] == 0).all()


@pytest.mark.parametrize("softmax", [False, True])
def test_reference_mask_drops_behaviors(softmax):
    inputs = make_inputs([4, 2, 3], 3, [5, 2], "prelu", torch.float64, seed=7, values_dim=2)
    inputs["mask"] = torch.tensor([True, False, True, True, False, False, True, False, True])
    out, grads = run(inputs, "reference", softmax=softmax)
    torch.testing.assert_close(out, per_sample_loop(inputs, softmax))
    assert (out[1] == 0).all()
    dropped = ~inputs["mask"]
    assert (grads[1][dropped] == 0).all() and (grads[2][dropped] == 0).all()  # keys, values


def test_reference_dice_training_ignores_masked_behaviors():
    inputs = make_inputs([4, 3], 3, [5], "dice", torch.float64, seed=2, training=True)
    inputs["mask"] = torch.tensor([True, True, False, True, False, True, True])
    keep = inputs["mask"]
    compact = {**inputs, "keys": inputs["keys"][keep], "offsets": offsets_from([3, 2]), "mask": None}
    compact["dice_running"] = [tuple(t.clone() for t in inputs["dice_running"][0])]
    torch.testing.assert_close(din_attention(**inputs), din_attention(**compact))
    for got, want in zip(inputs["dice_running"][0], compact["dice_running"][0], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_reference_gradcheck(activation):
    inputs = make_inputs([2, 0, 3], 2, [3], activation, torch.float64, seed=1, training=activation == "dice")

    def fn(*tensors):
        q, k, w1, w2, b1, b2, *alphas = tensors
        args = {**inputs, "query": q, "keys": k, "weights": [w1, w2], "biases": [b1, b2], "alphas": alphas or None}
        return din_attention(**args, softmax=True, backend="reference")

    assert torch.autograd.gradcheck(fn, trainable(inputs))


def test_reference_dice_training_uses_batch_statistics_and_updates_running_buffers():
    inputs = make_inputs([4, 3], 3, [5], "dice", torch.float64, seed=2, training=True)
    mean, var = (t.clone() for t in inputs["dice_running"][0])
    din_attention(**inputs, dice_momentum=0.5)
    w, b = inputs["weights"][0].detach(), inputs["biases"][0].detach()
    q, k = inputs["query"].detach(), inputs["keys"].detach()
    q_rows = q[torch.tensor([0, 0, 0, 0, 1, 1, 1])]
    pre = torch.cat([q_rows, k, q_rows - k, q_rows * k], -1) @ w + b
    torch.testing.assert_close(inputs["dice_running"][0][0], 0.5 * mean + 0.5 * pre.mean(0))
    torch.testing.assert_close(inputs["dice_running"][0][1], 0.5 * var + 0.5 * pre.var(0))


def test_validation_errors():
    inputs = make_inputs([2], 4, [3], "sigmoid", torch.float64, seed=3)
    with pytest.raises(ValueError, match="activation"):
        din_attention(**{**inputs, "activation": "gelu"})
    with pytest.raises(ValueError, match="layer 0"):
        din_attention(**{**inputs, "weights": [torch.ones(8, 3, dtype=torch.float64), inputs["weights"][1]]})
    with pytest.raises(ValueError, match="alpha"):
        din_attention(**{**inputs, "activation": "prelu"})
    with pytest.raises(ValueError, match="running"):
        din_attention(**{**inputs, "activation": "dice", "alphas": [torch.zeros(3, dtype=torch.float64)]})
    with pytest.raises(ValueError, match="mask"):
        din_attention(**{**inputs, "mask": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="dtype"):
        din_attention(**{**inputs, "keys": inputs["keys"].float()})


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
    dim=st.sampled_from([3, 8]),
    widths=st.sampled_from([[5], [8, 4], [20, 3]]),
    activation=st.sampled_from(["sigmoid", "relu", "prelu", "dice"]),
    values_dim=st.sampled_from([None, 3]),
    softmax=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_float64(lengths, dim, widths, activation, values_dim, softmax, masked, seed):
    inputs = make_inputs(lengths, dim, widths, activation, torch.float64, seed, values_dim, masked=masked)
    assert_parity(inputs, softmax=softmax, softmax_scale=0.7)


@requires_triton
@pytest.mark.parametrize("softmax", [False, True])
def test_triton_fully_masked_tiles_and_samples(softmax):
    # 16-row tiles: sample 0 has whole tiles masked before and after live rows, sample 1 is masked out entirely.
    inputs = make_inputs([40, 5], 4, [6, 3], "sigmoid", torch.float64, seed=8)
    mask = torch.zeros(45, dtype=torch.bool)
    mask[16:20] = True
    inputs["mask"] = mask
    assert_parity(inputs, softmax=softmax)
    out, grads = run(inputs, "triton", softmax=softmax)
    assert (out[1] == 0).all() and (grads[1][~mask] == 0).all()


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision(dtype):
    inputs = make_inputs([9, 1, 20], 8, [16, 8], "sigmoid", dtype, seed=4)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    assert_parity(inputs, softmax=True, **tol)


@requires_triton
def test_triton_falls_back_for_dice_training_and_deep_mlps(caplog):
    with caplog.at_level("WARNING"):
        assert_parity(make_inputs([3, 2], 2, [4], "dice", torch.float64, seed=5, training=True))
        assert_parity(make_inputs([3, 2], 2, [4, 3, 2], "sigmoid", torch.float64, seed=6))
    assert "batch statistics" in caplog.text and "3 hidden layers" in caplog.text
