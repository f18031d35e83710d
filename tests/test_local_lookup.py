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
    """Six steps with the one-rank look-up (item and category rows side by side, each reader's gradient straight to
    the update) and six with TorchRec's forward: every table, optimizer state and dense weight equal bit for bit."""
    from ctr.train import cpu_tables

    paired = []
    original = cpu_tables.lookup_blocks

    def spy(tbe, indices, offsets, order, sizes):
        paired.append(order is not None)
        return original(tbe, indices, offsets, order, sizes)

    monkeypatch.setattr(cpu_tables, "lookup_blocks", spy)
    fast_summary, fast = _run(tiny_data, tmp_path / "local", model, sets)
    assert fast_summary["local_lookups"] == collections
    assert paired and all(paired)  # every look-up laid its item/category pairs out side by side
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


def test_any_key_order_and_unequal_pairs_give_torchrecs_rows(tiny_data, tmp_path):
    """The collection's own batch order (no permutation), another order (permuted), and an item/category pair whose
    lengths differ in a batch (looked up apart): every feature's rows and lengths are TorchRec's, the pairs' blocks
    are their halves side by side, and the gradient reaches the tables."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from ctr.config import resolve_train_config
    from ctr.train.distributed import launch
    from ctr.train.worker import Training

    cfg, params = resolve_train_config("sdim", None, ["data.num_workers=0", "data.batch_size=16", "model.max_len=20"])

    def on_rank(ctx) -> None:
        tr = Training(ctx, tiny_data, tmp_path / "run", {"config": cfg.model_dump()}, cfg, params)
        sec = next(m for m in tr.dmp.modules() if hasattr(m, "_ctr_torchrec_forward"))
        names = list(sec.ctr_feature_order)
        g = torch.Generator().manual_seed(0)
        lengths = {f: torch.randint(0, 4, (5,), generator=g) for f in names}
        lengths["long_cate"] = lengths["long_item"]  # a pair of equal lengths: side by side
        lengths["cate"] = lengths["item"].clone()
        lengths["cate"][0] += 1  # a pair whose lengths differ: looked up apart
        ids = {f: torch.randint(1, 5, (int(lengths[f].sum()),), generator=g) for f in names}

        def kjt(keys: list[str]) -> KeyedJaggedTensor:
            return KeyedJaggedTensor(
                keys=keys, values=torch.cat([ids[f] for f in keys]), lengths=torch.cat([lengths[f] for f in keys]).int()
            )

        for keys in (names, sorted(names)):
            # (TorchRec's own forward fixes its order at its first batch: its reference is always in that order)
            fast, ref = sec(kjt(keys)), sec._ctr_torchrec_forward(kjt(names))
            for f in names:
                assert torch.equal(fast[f].values(), ref[f].values()), f
                assert torch.equal(fast[f].lengths().long(), ref[f].lengths().long()), f
            assert ("long_item", "long_cate") in fast.pairs and ("item", "cate") not in fast.pairs
            block = fast.pairs[("long_item", "long_cate")]
            assert torch.equal(block, torch.cat([ref["long_item"].values(), ref["long_cate"].values()], dim=-1))
            tables = cpu_tables.tbes(tr.dmp)
            before = [t.weights_host.clone() for t in tables]
            (block.sum() + fast["item"].values().sum()).backward()
            assert any(not torch.equal(b, t.weights_host) for b, t in zip(before, tables, strict=True))

    from ctr.train import cpu_tables

    launch(on_rank, 1, tmp_path / "rdv")
