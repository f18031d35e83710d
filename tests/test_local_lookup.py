"""`ctr.train.local_lookup`: on one rank, the embedding collections' look-up without TorchRec's distribution steps
trains the same model, bit for bit, as TorchRec's own forward."""

from __future__ import annotations

import json

import pytest
import torch

from ctr.train import local_lookup


def _run(data, root, model: str, sets: list[str]) -> tuple[dict, dict]:
    """Six steps of `ctr train` on one rank: (train summary, last checkpoint's state)."""
    from ctr.config import resolve_train_config
    from ctr.train.checkpoint import latest_complete, load_rank
    from ctr.train.trainer import train

    base = ["data.num_workers=0", "data.batch_size=64", "train.max_steps=6", "train.validation=false"]
    cfg, _ = resolve_train_config(model, None, base + sets)
    out = train(data, root, cfg)
    found = latest_complete(out / "checkpoints")
    assert found is not None
    return json.loads((out / "train_summary.json").read_text()), load_rank(found[0], 0)


def _tensors(state: dict, prefix: str = ""):
    for key, v in state.items():
        if isinstance(v, dict):
            yield from _tensors(v, f"{prefix}{key}.")
            continue
        v = v[0] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
        if isinstance(v, torch.Tensor):
            yield prefix + key, v


@pytest.mark.parametrize(
    ("model", "sets", "collections"),
    [
        ("din", [], 1),  # the batch's own KeyedJaggedTensor (`CTRModel.lookup`): permuted into the tables' order
        ("sdim", ["model.max_len=20", "optim.sparse=adam"], 1),  # built by `embed` in the tables' order
        ("sim_soft", ["model.max_len=20", "model.dare=true", "model.dare_att_dim=4"], 2),  # two collections
    ],
)
def test_training_is_torchrecs_bit_for_bit(tiny_data, tmp_path, monkeypatch, model, sets, collections):
    fast_summary, fast = _run(tiny_data, tmp_path / "local", model, sets)
    assert fast_summary["local_lookups"] == collections
    monkeypatch.setattr(local_lookup, "install", lambda *a, **k: 0)
    ref_summary, ref = _run(tiny_data, tmp_path / "torchrec", model, sets)
    assert ref_summary["local_lookups"] == 0
    compared = 0
    for part in ("model", "sparse_opt", "dense_opt"):
        a, b = dict(_tensors(fast[part])), dict(_tensors(ref[part]))
        assert a.keys() == b.keys(), part
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part} {key}"
            compared += "embedding" in key or part == "sparse_opt"
    assert compared >= 2 * collections  # the tables and their optimizer states were among them


def test_more_than_one_rank_keeps_torchrecs_path():
    assert local_lookup.install(torch.nn.Linear(2, 2), world_size=2) == 0
