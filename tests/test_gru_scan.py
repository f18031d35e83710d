"""`gru_scan` (DIEN's recurrences with a hand-written backward) against readable loops under autograd: every
state, the last state and the gradients of every input (projections, attention, initial state, weight, bias)."""

from __future__ import annotations

import pytest
import torch

from ctr.modules.augru import AUGRU, InterestExtractor
from ctr.modules.gru_scan import gru_scan


def reference(gx, att, mask, h0, weight, bias, form):  # type: ignore[no-untyped-def]
    """The module docstring's cells, one readable step at a time (autograd does the backward)."""
    hd = weight.shape[1]
    h, states = h0, []
    for t in range(gx.shape[1]):
        xr, xu, xc = gx[:, t].split(hd, dim=-1)
        wr, wu, wc = weight.split(hd, dim=0)
        if form == "official":
            r, u = torch.sigmoid(xr + h @ wr.t()), torch.sigmoid(xu + h @ wu.t())
            c = torch.tanh(xc + (r * h) @ wc.t())
            g = (1 - att[:, t : t + 1]) * u
            new = c + g * (h - c)
        else:
            br, bu, bc = bias.split(hd) if bias is not None else (0, 0, 0)
            r, u = torch.sigmoid(xr + h @ wr.t() + br), torch.sigmoid(xu + h @ wu.t() + bu)
            c = torch.tanh(xc + r * (h @ wc.t() + bc))
            g = 1 - u if form == "torch" else att[:, t : t + 1] * u
            new = h + g * (c - h)
        h = torch.where(mask[:, t : t + 1], new, h)
        states.append(h)
    return torch.stack(states, 1), h


def scan(gx, att, mask, h0, weight, bias, form):  # type: ignore[no-untyped-def]
    """`gru_scan` with a full [3H] state bias: its r and u parts folded into the projections, as the extractor does."""
    b_c = None
    if bias is not None:
        hd = weight.shape[1]
        gx = gx + torch.cat([bias[: 2 * hd], bias.new_zeros(hd)])
        b_c = bias[2 * hd :]
    return gru_scan(gx, att, mask, h0, weight, b_c, form)


def _inputs(form: str, b: int = 5, steps: int = 7, hd: int = 3, seed: int = 0) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 0, 1, 6][:b])
    mask = torch.arange(steps) < lengths.unsqueeze(1)
    gx = torch.randn(b, steps, 3 * hd, generator=g, dtype=torch.float64)
    att = torch.rand(b, steps, generator=g, dtype=torch.float64) if form != "torch" else None
    h0 = torch.randn(b, hd, generator=g, dtype=torch.float64)
    weight = torch.randn(3 * hd, hd, generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(3 * hd, generator=g, dtype=torch.float64) if form == "torch" else None
    return [gx, att, mask, h0, weight, bias]


@pytest.fixture(params=["whole", "halves"])
def row_blocks(request, monkeypatch):  # type: ignore[no-untyped-def]
    """The scan over the whole batch, and cut in two halves stepping in two threads (`gru_scan.SPLIT_MIN_ROWS`)."""
    if request.param == "halves":
        from ctr.modules import gru_scan as module

        monkeypatch.setattr(module, "SPLIT_MIN_ROWS", 2)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        yield request.param
        assert torch.get_num_threads() == 2  # the caller's threads are given back
        torch.set_num_threads(threads)
    else:
        yield request.param


@pytest.mark.parametrize("form", ["torch", "paper", "official"])
def test_scan_and_its_gradients_are_the_readable_loop(form: str, row_blocks: str) -> None:
    inputs = _inputs(form)
    x, h0 = inputs[0], inputs[3]
    leaves = [v for v in inputs if v is not None and v.dtype != torch.bool]
    g = torch.Generator().manual_seed(1)
    d_states = torch.randn(x.shape[0], x.shape[1], h0.shape[1], generator=g, dtype=torch.float64)
    d_last = torch.randn(h0.shape, generator=g, dtype=torch.float64)
    results = []
    for fn in (reference, scan):
        xs = [v.detach().clone().requires_grad_(True) for v in leaves]
        it = iter(xs)
        args = [next(it) if v is not None and v.dtype != torch.bool else v for v in inputs]
        states, last = fn(*args, form)
        ((states * d_states).sum() + (last * d_last).sum()).backward()
        results.append((states.detach(), last.detach(), [x.grad for x in xs]))
    (s0, l0, g0), (s1, l1, g1) = results
    torch.testing.assert_close(s1, s0)
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b)
    # padding keeps the state, and the empty row's last state is h0
    torch.testing.assert_close(l1[2], h0[2])
    torch.testing.assert_close(s1[1, 3:], s1[1, 2].expand(4, -1))


@pytest.mark.parametrize("form", ["torch", "paper", "official"])
def test_scan_passes_gradcheck(form: str, row_blocks: str) -> None:
    inputs = _inputs(form, b=3, steps=4, hd=2, seed=3)
    args = [v.requires_grad_(True) if v is not None and v.dtype != torch.bool else v for v in inputs]
    assert torch.autograd.gradcheck(lambda *a: scan(*a, form), tuple(args))


def test_extractor_is_nn_gru_at_real_positions() -> None:
    torch.manual_seed(0)
    fused, plain = InterestExtractor(4, 6), InterestExtractor(4, 6, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.arange(5) < torch.tensor([5, 2, 0]).unsqueeze(1)
    a, b = fused(x, mask), plain(x, mask)
    torch.testing.assert_close(a, b)
    grads = []
    for m in (fused, plain):
        x.grad = None
        m.zero_grad()
        (m(x, mask) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for u, v in zip(*grads, strict=True):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("form", ["paper", "official"])
def test_augru_fused_is_its_loop(form: str) -> None:
    torch.manual_seed(0)
    fused, loop = AUGRU(5, 4, form=form), AUGRU(5, 4, form=form, fused=False)
    loop.load_state_dict(fused.state_dict())
    x, att = torch.randn(4, 6, 5, requires_grad=True), torch.rand(4, 6, requires_grad=True)
    mask = torch.arange(6) < torch.tensor([6, 2, 0, 4]).unsqueeze(1)
    out = []
    for m in (fused, loop):
        x.grad = att.grad = None
        states, last = m(x, att, mask)
        (states.sum() + (last**2).sum()).backward()
        out.append(
            [states.detach(), last.detach(), x.grad.clone(), att.grad.clone()] + [p.grad for p in m.parameters()]
        )
    for u, v in zip(*out, strict=True):
        torch.testing.assert_close(u, v)


def test_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="form"):
        gru_scan(*_inputs("paper"), "lstm")
