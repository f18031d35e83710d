"""LAIN (ctr/modules/lain.py) and its wiring into every backbone: ``din_lain``, ``dien_lain`` and the two-stage
``sim_hard_lain``, ``sim_soft_lain``, ``muse_lain``, ``r2led_lain`` (ctr/models/two_stage.py).

Data: the session's tiny synthetic dataset with semantic IDs (conftest's `sid_data`, which R2LED needs); set
``CTR_TEST_MODELS_DATA`` to a built dataset directory to skip the build. Torch runs on one thread (see
tests/test_models.py).
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import STEPS, aux_of, batches, build, subset, train_steps  # noqa: E402

from ctr.config import resolve_train_config
from ctr.models import get_model_class
from ctr.modules.lain import (
    LainConditioner,
    LainParams,
    LengthTemperature,
    SpectralLengthEncoder,
    prepend_prompts,
)
from features.dataset import DatasetInfo
from features.loader import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

LAIN_MODELS = ["din_lain", "dien_lain", "sim_hard_lain", "sim_soft_lain", "muse_lain", "r2led_lain"]


@pytest.fixture(scope="module")
def info(sid_data) -> DatasetInfo:
    return DatasetInfo.load(sid_data)


def view_prefixes(model) -> list[str]:
    return [f"{v.name}_" for v in model.views()]


def with_dense(batch: Batch, **dense: torch.Tensor) -> Batch:
    return Batch(sparse=batch.sparse, dense={**batch.dense, **dense}, size=batch.size)


# ---- the module -------------------------------------------------------------------------------------------------


def test_spectral_length_encoder_and_temperature():
    torch.manual_seed(0)
    length = torch.tensor([0, 1, 10, 100, 1_000, 100_000])
    for transform in ("log1p", "raw"):
        sle = SpectralLengthEncoder(8, fourier_dim=4, transform=transform)
        h = sle(length)
        assert h.shape == (6, 8) and torch.isfinite(h).all()
        assert sle.features(length).shape == (6, 8)
        assert all(not torch.allclose(h[i], h[i + 1]) for i in range(5))
    tau = LengthTemperature(l0=100.0, beta=2.0, gamma=1.0)(length)
    # tau = 1 + gamma * sigmoid(-beta (log1p L - log1p L0)): > 1, falls with L, 1.5 at L0, -> 1 for long histories
    assert (tau > 1).all() and (tau[1:] < tau[:-1]).all()
    assert tau[3].item() == pytest.approx(1.5)
    assert tau[-1].item() < 1.001 and tau[0].item() > 1.99


def test_prepend_prompts_masks_and_positions():
    seq = torch.randn(3, 4, 2)
    mask = torch.arange(4) < torch.tensor([4, 1, 0]).unsqueeze(1)
    prompts = torch.randn(3, 2, 2)
    out, m = prepend_prompts(prompts, seq, mask)
    assert out.shape == (3, 6, 2) and m.shape == (3, 6)
    torch.testing.assert_close(out[:, :2], prompts)
    torch.testing.assert_close(out[:, 2:], seq)
    assert m[:, :2].all()  # prompts are real, also for the empty history
    torch.testing.assert_close(m.sum(1), torch.tensor([6, 3, 2]))
    same, same_mask = prepend_prompts(None, seq, mask)
    assert same is seq and same_mask is mask


def test_inactive_conditioner_is_the_identity():
    torch.manual_seed(0)
    lain = LainConditioner(LainParams(enabled=True, prompts=3), {"hist": (6, 4)}, prompt_dim=6, median_length=50)
    length = torch.tensor([0, 7, 400])
    h = lain.encode(length)
    q, k, s = torch.randn(3, 6), torch.randn(3, 5, 4), torch.randn(3, 5)
    assert lain.prompts(h).shape == (3, 3, 6) and lain.num_prompts == 3
    assert lain.temperature(length).shape == (3,)
    # at start W_q, W_k are [I | 0]: conditioning is the identity until it learns to mix in the length
    torch.testing.assert_close(lain.condition_query(q, h, "hist"), q)
    torch.testing.assert_close(lain.condition_key(k, h, "hist"), k)
    assert not torch.allclose(lain.temper(s, length), s)
    lain.active = False
    assert lain.prompts(h) is None and lain.temperature(length) is None and lain.num_prompts == 0
    assert lain.condition_query(q, h, "hist") is q and lain.condition_key(k, h, "hist") is k
    assert lain.temper(s, length) is s
    # ablation switches: without LCP / QK conditioning / temperature
    bare = LainConditioner(
        LainParams(enabled=True, prompts=0, qk_conditioning=False, temperature=False), {"hist": (6, 4)}, 6
    )
    assert bare.prompts(h) is None and bare.condition_key(k, h, "hist") is k and bare.temperature(length) is None


def test_prompts_are_per_sample():
    """Row b's prompts and conditioning depend on L_b only: batch composition and order do not leak."""
    torch.manual_seed(0)
    lain = LainConditioner(LainParams(enabled=True, prompts=2), {"hist": (4, 4)}, prompt_dim=4, median_length=50)
    with torch.no_grad():
        for p in lain.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the identity start
    length = torch.tensor([3, 50, 3, 900, 0])
    k = torch.randn(5, 6, 4)
    full_p = lain.prompts(lain.encode(length))
    full_k = lain.condition_key(k, lain.encode(length), "hist")
    for b in range(5):
        h_b = lain.encode(length[b : b + 1])
        torch.testing.assert_close(lain.prompts(h_b)[0], full_p[b])
        torch.testing.assert_close(lain.condition_key(k[b : b + 1], h_b, "hist")[0], full_k[b])
    torch.testing.assert_close(full_p[0], full_p[2])  # same length, same prompts
    assert not torch.allclose(full_p[0], full_p[1])


# ---- the models -------------------------------------------------------------------------------------------------


def softmax_form(name: str) -> dict:
    """The variants' DIN-form attentions default to the softmax form (LAIN's τ is a sharpness there)."""
    fields = get_model_class(name).Params.model_fields
    return {f: True for f in ("softmax", "short_softmax") if f in fields}


BACKBONES = [
    ("din", {}),
    ("din", {"softmax": True, "attention_activation": "sigmoid"}),
    ("dien", {}),
    ("dien", {"attention": "din", "augru": "official"}),
    ("sim_hard", {}),
    ("sim_hard", {"dare": True, "time_buckets": 0, "short_softmax": True}),
    ("sim_soft", {}),
    ("muse", {}),
    ("muse", {"dare": True, "short_simtier": True}),
    ("r2led", {}),
]


def test_defaults_unchanged(info):
    """The backbones build no LAIN parameter by default; the LAIN variants are registered with LAIN on."""
    for name in [m.removesuffix("_lain") for m in LAIN_MODELS]:
        model = build(info, name)
        assert model.lain is None and model.p.lain.enabled is False
        assert not any(k.startswith("lain.") for k in model.state_dict())
        variant = build(info, f"{name}_lain")
        assert variant.p.lain.enabled and variant.lain is not None
        # the backbone's parameters start as the plain backbone's with the same seed (LAIN is built last)
        base = model.state_dict()
        for key, value in variant.state_dict().items():
            if not key.startswith("lain."):
                torch.testing.assert_close(value, base[key], rtol=0, atol=0, msg=key)
    cls = get_model_class("din")
    with pytest.raises(ValueError, match="backend"):
        cls.Params(backend="auto", lain={"enabled": True})
    with pytest.raises(ValueError, match="paper"):
        get_model_class("muse").Params(mode="code", lain={"enabled": True})


@pytest.mark.parametrize("name, params", BACKBONES)
def test_switched_off_equals_the_backbone(info, name, params):
    backbone = build(info, name, seed=1, **{**softmax_form(name), **params})
    lain = build(info, f"{name}_lain", seed=2, **params)
    missing, unexpected = lain.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("lain.") for k in missing)
    batch = batches(info, backbone, 1)[0]
    lain.lain.active = False
    for train in (True, False):
        backbone.train(train)
        lain.train(train)
        a, b = backbone(batch), lain(batch)
        torch.testing.assert_close(b.logit, a.logit, rtol=0, atol=0)  # bitwise
        a_aux, b_aux = aux_of(backbone, a, batch), aux_of(lain, b, batch)
        assert (a_aux is None) == (b_aux is None)
        if a_aux is not None:
            torch.testing.assert_close(b_aux, a_aux, rtol=0, atol=0)
    lain.lain.active = True
    with torch.no_grad():
        assert not torch.allclose(lain(batch).logit, backbone(batch).logit, atol=1e-6)


@pytest.mark.parametrize("name", LAIN_MODELS)
def test_outputs_depend_on_hist_len(info, name):
    model = build(info, name).eval()
    backbone = build(info, name.removesuffix("_lain")).eval()
    batch = batches(info, model, 1)[0]
    length = batch.dense["hist_len"]
    for prefix in view_prefixes(model):
        assert (length >= batch.dense[f"{prefix}lengths"]).all()  # the full prefix, not the truncated views
    other = with_dense(batch, hist_len=length * 7 + 3)
    with torch.no_grad():
        assert not torch.allclose(model(batch).logit, model(other).logit, atol=1e-6)
        torch.testing.assert_close(backbone(batch).logit, backbone(other).logit, rtol=0, atol=0)
    # each ablation still depends on the length (prompts only; temperature only; QK conditioning starts at [I | 0]).
    # With fresh (tiny) embeddings DIEN's attention is nearly uniform, so τ alone moves its logits only by ~1e-7:
    # exact inequality (the batch is the same, only hist_len differs)
    for ablation in ({"qk_conditioning": False, "temperature": False}, {"prompts": 0, "qk_conditioning": False}):
        m = build(info, name, lain={"enabled": True, **ablation}).eval()
        with torch.no_grad():
            assert not torch.equal(m(batch).logit, m(other).logit), ablation


@pytest.mark.parametrize("name", LAIN_MODELS)
def test_training_loss_decreases(info, name):
    model = build(info, name).train()
    batch_list = batches(info, model)
    before = {k: v.clone() for k, v in model.lain.state_dict().items()}
    losses = train_steps(model, batch_list, with_aux=True)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.02, (first, last)
    moved = [k for k, v in model.lain.state_dict().items() if not torch.equal(v, before[k])]
    parts = ["encoder.", "prompt_head.", "tau."]
    for branch in model.lain.query_proj:  # DIN / DIEN: hist; two-stage: short and long
        parts += [f"query_proj.{branch}.h.", f"key_proj.{branch}.h."]
    for part in parts:
        assert any(k.startswith(part) for k in moved), part  # every LAIN component receives gradients


@pytest.mark.parametrize("name", LAIN_MODELS)
def test_padding_invariance_and_empty_histories(info, name):
    """In eval, a sample's logit does not depend on the other samples of its batch (how far it is padded, their
    prompts); a sample without history still gets its prompts and a finite logit."""
    model = build(info, name, seed=3)
    train_steps(model, batches(info, model, 3))
    model.eval()
    batch = batches(info, model, 4)[3]
    with torch.no_grad():
        full = model(batch).logit
    prefixes = view_prefixes(model)
    lengths = batch.dense[f"{prefixes[0]}lengths"]
    rows = torch.argsort(lengths)[:16]
    assert int(lengths[rows].max()) < int(lengths.max())
    with torch.no_grad():
        part = model(subset(batch, rows)).logit
        reversed_part = model(subset(batch, rows.flip(0))).logit
    torch.testing.assert_close(part, full[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reversed_part.flip(0), part, rtol=1e-5, atol=1e-5)
    # an empty history: drop every behavior of one sample
    row = rows[:1]
    one = subset(batch, row)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = one.sparse
    keep = [k for k in kjt.keys() if not k.startswith(tuple(prefixes))]
    values = torch.cat([kjt[k].values() for k in keep])
    lengths_all = torch.cat([kjt[k].lengths() if k in keep else torch.zeros(1, dtype=kjt[k].lengths().dtype)
                             for k in kjt.keys()])  # fmt: skip
    dense = {k: (torch.zeros_like(v[:0]) if k.endswith("_ts_gap") else v) for k, v in one.dense.items()}
    for prefix in prefixes:
        dense[f"{prefix}lengths"] = torch.zeros_like(one.dense[f"{prefix}lengths"])
    empty = Batch(KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=lengths_all), dense, 1)
    with torch.no_grad():
        out = model(empty).logit
        model.lain.active = False
        out_off = model(empty).logit
    assert torch.isfinite(out).all() and not torch.allclose(out, out_off)


def test_config_resolution():
    cfg, params = resolve_train_config("din_lain", None, ["model.lain.prompts=3", "model.lain.temperature=false"])
    assert cfg.model["name"] == "din_lain"
    assert params.lain.enabled and params.lain.prompts == 3 and not params.lain.temperature
    _, dien = resolve_train_config("dien_lain")
    assert dien.lain.enabled and dien.seq_len == resolve_train_config("dien")[1].seq_len
    _, din = resolve_train_config("din")
    assert not din.lain.enabled
    _, on = resolve_train_config("din", None, ["model.lain.enabled=true"])
    assert on.lain.enabled
    # the two-stage variants: their backbone's file (base:) plus the shared LAIN block
    for name in ("sim_hard", "sim_soft", "muse", "r2led"):
        cfg, variant = resolve_train_config(f"{name}_lain")
        backbone_cfg, backbone = resolve_train_config(name)
        assert cfg.model["name"] == f"{name}_lain" and variant.lain.enabled and not backbone.lain.enabled
        assert variant.short_softmax and not backbone.short_softmax  # the softmax form where LAIN's τ applies
        assert variant.model_dump(exclude={"lain", "short_softmax"}) == backbone.model_dump(
            exclude={"lain", "short_softmax"}
        )
        assert cfg.data == backbone_cfg.data and cfg.optim == backbone_cfg.optim
