"""A GSU that keeps the top k of every behavior (TWIN, ETA, SIM soft) keeps the whole prefix when no prefix can be
longer than k (`TwoStageModel.fits_k`: max_len <= k): the search is skipped (its choice is known, these ESUs do not
depend on the slots' order, and what else the search computes comes from `whole_extras`: SIM soft's auxiliary head)
and training looks the prefix up once, with gradient, instead of once for the search and again
for the selected rows. The logits, loss terms and every gradient (the embedding tables' included) are those of the
search and the two look-ups; with max_len > k every batch still takes them, whatever its lengths (ranks must make
the same look-ups)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import batches, build

from ctr.modules.gsu import Selection

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(info, name: str, params: dict, fits: bool | None, monkeypatch) -> tuple:
    """One training forward/backward; ``fits`` forces `fits_k` (None: the model's own answer). Returns the look-ups
    made (grad enabled or not, per call), the logits, loss terms and gradients."""
    model = build(info, name, **params).train()
    if fits is not None:
        monkeypatch.setattr(type(model), "fits_k", lambda self: fits)
    calls: list[bool | str] = []
    embed, search = type(model).embed, type(model).search

    def spy(self, ids):  # type: ignore[no-untyped-def]
        calls.append(torch.is_grad_enabled())
        return embed(self, ids)

    def spy_search(self, *args):  # type: ignore[no-untyped-def]
        calls.append("search")
        return search(self, *args)

    monkeypatch.setattr(type(model), "embed", spy)
    monkeypatch.setattr(type(model), "search", spy_search)
    batch = batches(info, model, 1)[0]
    torch.manual_seed(1)
    out = model(batch)
    terms = model.loss(out, batch)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    monkeypatch.undo()
    return calls, out.logit.detach(), {k: v.detach() for k, v in terms.items()}, grads


TWO_LOOK_UPS = [False, "search", True]  # the search's look-up without gradient, the search, the selected rows'
ONE_LOOK_UP = [True, "search"]  # SIM soft: its search and auxiliary head read the prefix looked up with gradient


@pytest.mark.parametrize(
    ("name", "params", "searched"),
    [
        ("twin", {"max_len": 30}, TWO_LOOK_UPS),  # k 100
        ("twin", {"max_len": 30, "gsu_path": "projected"}, TWO_LOOK_UPS),
        ("twin", {"max_len": 30, "k": 30, "short_len": 12}, TWO_LOOK_UPS),
        ("eta", {"max_len": 40, "k": 40}, TWO_LOOK_UPS),
        ("sim_soft", {"max_len": 40, "k": 40}, ONE_LOOK_UP),  # the auxiliary loss from `whole_extras`
        ("sim_soft", {"max_len": 40, "k": 40, "aux_pooling": "mean", "short_len": 12}, ONE_LOOK_UP),
        ("sim_soft", {"max_len": 40, "k": 40, "dare": True}, ONE_LOOK_UP),  # the attention tables' relevance
        ("sim_soft", {"max_len": 40, "k": 40, "lain": {"enabled": True}}, ONE_LOOK_UP),  # the ESU on slots
        ("sim_soft", {"max_len": 40, "k": 40, "esu": "tin"}, ONE_LOOK_UP),  # TIN's ESU, on slots too
    ],
)
def test_one_look_up_when_every_prefix_fits_in_k(info, name, params, searched, monkeypatch):
    calls2, logit2, terms2, grads2 = _run(info, name, params, False, monkeypatch)
    calls1, logit1, terms1, grads1 = _run(info, name, params, None, monkeypatch)
    # the search (and its look-ups); or one look-up and no search
    assert calls2 == searched and calls1 == [True]
    torch.testing.assert_close(logit1, logit2, rtol=0, atol=1e-6)
    assert terms1.keys() == terms2.keys() and grads1.keys() == grads2.keys()
    for k in terms1:
        torch.testing.assert_close(terms1[k], terms2[k], rtol=0, atol=1e-6)
    tables = [n for n in grads1 if "embedding" in n]
    assert tables and all(grads1[n].abs().sum() > 0 for n in tables)
    for n in grads1:
        torch.testing.assert_close(grads1[n], grads2[n], rtol=1e-5, atol=1e-7, msg=n)


def test_twin_v2_over_virtual_items(cluster_info, monkeypatch):
    calls2, logit2, _, grads2 = _run(cluster_info, "twin_v2", {"max_len": 30}, False, monkeypatch)
    calls1, logit1, _, grads1 = _run(cluster_info, "twin_v2", {"max_len": 30}, None, monkeypatch)
    assert calls2 == [False, "search", True] and calls1 == [True]
    torch.testing.assert_close(logit1, logit2, rtol=0, atol=1e-6)
    for n in grads1:
        torch.testing.assert_close(grads1[n], grads2[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fits_k_is_decided_by_the_configuration(info, monkeypatch):
    assert build(info, "twin", max_len=100).fits_k() and build(info, "eta", max_len=50, k=50).fits_k()
    # not by a batch's lengths: with max_len > k, a batch whose prefixes all fit in k still takes the search and the
    # two look-ups, as another rank's batch may not (each look-up of sharded tables is a collective)
    params = {"max_len": 10001, "k": 10000}
    model = build(info, "twin", **params)
    assert not model.fits_k()
    assert int(batches(info, model, 1)[0].dense["long_lengths"].max()) <= 10000
    calls = _run(info, "twin", params, None, monkeypatch)[0]
    assert calls == [False, "search", True]
    # a GSU that may keep fewer than its prefix (SIM hard's category filter) never skips it
    assert not build(info, "sim_hard", max_len=10).fits_k()


def test_the_whole_selection():
    sel = Selection.whole(torch.tensor([3, 0, 1]))
    assert sel.positions.tolist() == [[0, 1, 2], [-1, -1, -1], [0, -1, -1]]
    assert sel.mask.sum(1).tolist() == [3, 0, 1] and not sel.scores.any()
    assert Selection.whole(torch.zeros(2, dtype=torch.long)).positions.tolist() == [[-1], [-1]]


@pytest.mark.parametrize(
    ("name", "params"),
    [("twin", {"max_len": 30}), ("eta", {"max_len": 40, "k": 40}), ("sim_soft", {"max_len": 40, "k": 40})],
)
def test_the_whole_prefix_is_read_as_rows(info, name, params, monkeypatch):
    """At `fits_k` the ESU reads the looked-up prefix as rows (`LongRows.jagged`, `ctr.native.attention_rows`): no
    slot of the long branch (embeddings, time gaps, ids) is laid out, forward or in the loss."""
    from ctr import native
    from ctr.models.stage_input import LongRows

    assert native.available(), native.unavailable_reason()
    placed: list[str] = []
    place = LongRows._place

    def spy(self, what, v, prefix):  # type: ignore[no-untyped-def]
        placed.append(what)
        return place(self, what, v, prefix)

    monkeypatch.setattr(LongRows, "_place", spy)
    model = build(info, name, **params).train()
    assert model.fits_k()
    batch = batches(info, model, 1)[0]
    out = model(batch)
    sum(model.loss(out, batch).values()).backward()
    assert placed == []
