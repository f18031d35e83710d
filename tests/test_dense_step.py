"""`ctr.train.setup.DenseStep`: clipping and the dense optimizer's step with less Python, the same update bit for bit
as `torch.nn.utils.clip_grad_norm_` then ``optimizer.step()``."""

from __future__ import annotations

import copy

import pytest
import torch

from ctr.train.setup import DenseStep


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 40), torch.nn.ReLU(), torch.nn.Linear(40, 7), torch.nn.Linear(7, 1))


@pytest.mark.parametrize(
    ("opt", "kw", "clip"),
    [
        (torch.optim.Adam, {"lr": 1e-2, "fused": True}, 10.0),
        (torch.optim.Adam, {"lr": 1e-2, "fused": True, "weight_decay": 1e-3}, 0.05),  # clipping on every step
        (torch.optim.AdamW, {"lr": 1e-2, "fused": True, "weight_decay": 1e-2}, 0.0),
        (torch.optim.SGD, {"lr": 1e-2}, 1.0),  # not direct: the functions themselves
    ],
)
def test_the_same_update_as_clip_grad_norm_then_step(opt, kw, clip):
    ours_model, ref_model = _model(), _model()
    ours_opt, ref_opt = opt(ours_model.parameters(), **kw), opt(ref_model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.ExponentialLR(ours_opt, gamma=0.9)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref_opt, gamma=0.9)
    step = DenseStep(list(ours_model.parameters()), ours_opt, clip)
    assert step._direct == (opt is not torch.optim.SGD)
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        x = torch.randn(64, 13, generator=gen) * (10.0 if i % 2 else 1.0)
        for model, o in ((ours_model, ours_opt), (ref_model, ref_opt)):
            o.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
        step()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), clip)
        ref_opt.step()
        if i == 3:
            sched.step()
            ref_sched.step()
        for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(a, b), i
    for a, b in zip(ours_opt.state.values(), ref_opt.state.values(), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_a_parameter_without_gradient_takes_the_functions_path():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    step = DenseStep(list(model.parameters()), optimizer, 1.0)
    for _ in range(3):
        for m, o in ((model, optimizer), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            m[0](torch.ones(2, 13)).sum().backward()  # the later layers get no gradient
        step()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
