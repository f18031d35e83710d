"""SIM soft with the GSU and the ESU fused (`kernels.search_attend`, Triton in the interpreter) trains exactly as the
unfused model: same selection, logits, loss terms and gradients, embedding tables and the time-gap table included."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The Triton kernels run on the CPU only in the interpreter, chosen when their modules are first imported (lazily,
# on the first Triton call): set before any test of this process calls one.
os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/kernels would shadow the `kernels` package under a plain `pytest` (see tests/test_models.py)
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None) is None:
    for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[_name]

from model_helpers import batches, build, subset  # noqa: E402

from kernels._backend import triton_available  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not triton_available(), reason="triton does not import"),
]


@pytest.mark.parametrize("time_buckets", [32, 0])
def test_sim_soft_fused_search_trains_as_the_unfused_model(info, time_buckets):
    """With the time-gap embedding (the default, read by the kernel from its table) and without (FuxiCTR's SIM)."""
    runs = []
    for backend in ("reference", "triton"):
        model = build(info, "sim_soft", time_buckets=time_buckets, backend=backend).train()
        batch = subset(batches(info, model, 1)[0], torch.arange(24))
        inp = model.prepare(batch)
        assert (inp.esu_out is not None) == (backend == "triton")  # the fused path ran exactly on Triton
        out = model(batch)
        terms = model.loss(out, batch)
        sum(terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((inp.selection.positions, out.logit.detach(), {k: v.detach() for k, v in terms.items()}, grads))
    (pos, logit, terms, grads), (pos1, logit1, terms1, grads1) = runs
    assert torch.equal(pos, pos1)
    torch.testing.assert_close(logit1, logit, rtol=0, atol=1e-5)
    assert terms.keys() == terms1.keys() == {"ctr", "aux"} and grads.keys() == grads1.keys()
    for k in terms:
        torch.testing.assert_close(terms1[k], terms[k], rtol=0, atol=1e-6)
    tables = [n for n in grads if "embedding" in n]
    assert tables and any(grads[n].abs().sum() > 0 for n in tables)
    for n in grads:
        torch.testing.assert_close(grads1[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_configurations_without_a_fused_form_keep_the_gather(info):
    for params in ({"dare": True}, {"esu": "tin"}):
        model = build(info, "sim_soft", backend="triton", **params).eval()
        batch = subset(batches(info, model, 1)[0], torch.arange(4))
        assert model.prepare(batch).esu_out is None
