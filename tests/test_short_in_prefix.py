"""A two-stage model that embeds the whole prefix reads its short window from the prefix's tail
(`TwoStageModel.short_in_prefix`, `ctr.models.slots.tail_rows`) instead of looking it up again: the short branch's
inputs are the separate look-up's bit for bit, and training gives the same logits, loss terms and gradients (the
embedding tables' included: a row the short window shares with the prefix is summed in one place instead of two)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from model_helpers import batches, build

from ctr.models import two_stage
from features.loader import SequenceView

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(info, name: str, params: dict, tail: bool, train: bool, monkeypatch) -> tuple:
    model = build(info, name, **params)
    model.train(train)
    monkeypatch.setattr(type(model), "short_in_prefix", lambda self: tail)
    batch = batches(info, model, 1)[0]
    seen = {}
    prepare = type(model).prepare

    def spy(self, b):  # type: ignore[no-untyped-def]
        inp = prepare(self, b)
        seen.update(short=inp.short.detach().clone(), short_att=inp.short_att.detach().clone(), mask=inp.short_mask)
        return inp

    monkeypatch.setattr(type(model), "prepare", spy)
    torch.manual_seed(1)
    with torch.set_grad_enabled(train):
        out = model(batch)
        terms = model.loss(out, batch) if train else {}
        if train:
            sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    monkeypatch.undo()
    return seen, out.logit.detach(), {k: v.detach() for k, v in terms.items()}, grads


@pytest.mark.parametrize(
    ("name", "params", "train"),
    [
        ("sim_soft", {}, True),
        ("sim_soft", {"dare": True}, True),
        ("sim_soft_lain", {}, True),
        ("sdim", {}, True),
        ("sim_soft", {"short_len": 7, "max_len": 30}, True),
        ("sim_soft", {"short_len": 30, "max_len": 30}, True),  # every prefix is its own tail: laid out, not gathered
        ("twin", {}, False),  # the models that look up the selected rows again in training: evaluation only
        ("muse", {"gsu": "id_cosine"}, False),
        ("eta", {}, False),
    ],
)
def test_the_short_window_from_the_prefix_is_the_separate_look_up(info, name, params, train, monkeypatch):
    a = _run(info, name, params, False, train, monkeypatch)
    b = _run(info, name, params, True, train, monkeypatch)
    (seen, logit, terms, grads), (seen1, logit1, terms1, grads1) = a, b
    assert seen["mask"].any() and not seen["mask"].all()  # real and padded slots both
    for k in seen:
        assert torch.equal(seen[k], seen1[k]), k
    torch.testing.assert_close(logit1, logit, rtol=0, atol=1e-6)
    assert terms.keys() == terms1.keys() and grads.keys() == grads1.keys()
    for k in terms:
        torch.testing.assert_close(terms1[k], terms[k], rtol=0, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads1[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    if train:
        assert any("embedding" in n and grads[n].abs().sum() > 0 for n in grads)


@pytest.mark.parametrize("item_repr", ["sid", "id+sid"])
def test_the_short_window_from_the_prefix_with_semantic_id_items(sid_data, item_repr, monkeypatch):
    """Items pooled from their semantic-ID pieces (`item_repr`): the short window's vectors are its items' pooled
    vectors either way."""
    from features.dataset import DatasetInfo

    info = DatasetInfo.load(sid_data)
    params = {"item_repr": item_repr}
    (seen, logit, terms, grads), (seen1, logit1, terms1, grads1) = (
        _run(info, "sim_soft", params, tail, True, monkeypatch) for tail in (False, True)
    )
    for k in seen:
        assert torch.equal(seen[k], seen1[k]), k
    torch.testing.assert_close(logit1, logit, rtol=0, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads1[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_which_models_read_the_short_window_from_the_prefix(info):
    assert build(info, "sim_soft").short_in_prefix()
    assert not build(info, "sim_soft", short_len=60, max_len=50).short_in_prefix()  # the window is longer
    clusters = SimpleNamespace(views=lambda: (SequenceView("long", 50, clusters=True), SequenceView("short", 50)))
    assert not two_stage.TwoStageModel.short_in_prefix(clusters)  # TWIN-V2's long view: clusters, not behaviors
