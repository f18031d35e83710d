"""What the model test modules share: one torch thread, the tiny dataset, cached training batches, a seeded build.

The fixtures `info` (the tiny dataset, or ``$CTR_TEST_MODELS_DATA`` to skip its build while iterating) and
`one_thread` live in conftest.py; a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctr.models import get_model_class
from features.dataset import DatasetInfo
from features.loader import Batch, LoaderConfig, SplitLoader

STEPS = 30


_BATCHES: dict[tuple, list[Batch]] = {}


def batches(info: DatasetInfo, model, n: int = STEPS) -> list[Batch]:
    """The first `n` shuffled training batches of 256 for this model's views and features (cached)."""
    key = (str(info.data_dir), model.views(), tuple(model.features()))
    if key not in _BATCHES or len(_BATCHES[key]) < n:
        loader = SplitLoader(
            info, "train", LoaderConfig(batch_size=256, views=model.views(), shuffle=True), model.features()
        )
        _BATCHES[key] = [b for _, b in zip(range(n), loader, strict=False)]
    return _BATCHES[key][:n]


def build(info: DatasetInfo, name: str, seed: int = 0, **params):
    """Model `name` with `params` over `info`, initialized under `seed`."""
    torch.manual_seed(seed)
    cls = get_model_class(name)
    return cls(cls.Params(**params), info)


def loss_of(model, out, batch: Batch) -> torch.Tensor:
    """The training loss as the trainer takes it: the sum of the model's named terms (`CTRModel.loss`)."""
    return sum(model.loss(out, batch).values())


def aux_of(model, out, batch: Batch) -> torch.Tensor | None:
    """The model's weighted auxiliary loss term, or None when it has none for this output."""
    return model.loss(out, batch).get("aux")


def train_steps(model, batch_list: list[Batch], with_aux: bool = False) -> list[float]:
    """One Adam step (lr 1e-3) per batch, checking logits are finite and one per sample; returns the per-step BCE
    (plus the auxiliary loss when `with_aux`)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for batch in batch_list:
        out = model(batch)
        assert out.logit.shape == (batch.size,) and torch.isfinite(out.logit).all()
        loss = loss_of(model, out, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bce = F.binary_cross_entropy_with_logits(out.logit, batch.dense["label"])
        losses.append(loss.item() if with_aux else bce.item())
    return losses


def subset(batch: Batch, rows: torch.Tensor) -> Batch:
    """The samples `rows` of `batch` as a batch of their own (so padded to their own longest history)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def take(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
        offsets[1:] = lengths.long().cumsum(0)
        return torch.cat([values[offsets[r] : offsets[r + 1]] for r in rows.tolist()]), lengths[rows]

    kjt = batch.sparse
    parts = [take(kjt[key].values(), kjt[key].lengths()) for key in kjt.keys()]
    sparse = KeyedJaggedTensor(
        keys=kjt.keys(), values=torch.cat([v for v, _ in parts]), lengths=torch.cat([n for _, n in parts])
    )
    dense = {}
    for k, v in batch.dense.items():
        if k.endswith(("_ts_gap", "_btype", "_size")):
            dense[k] = take(v, batch.dense[k.rsplit("_", 2)[0] + "_lengths"])[0]
        else:
            dense[k] = v[rows]
    return Batch(sparse=sparse, dense=dense, size=len(rows))


def check_narrow_attention_tables(info: DatasetInfo, model, name: str, behavior_feature: str) -> None:
    """A model built with ``dare=True, dare_att_dim=4``: its attention tables are a second collection 4 wide fed by
    ``behavior_feature`` (and the target), the loader is unchanged, the attention reads them (scaling one changes the
    logits), they learn, and the fused sparse optimizer gets both collections."""
    import math

    assert model.att_embedding is not None
    att = {c.name: c for c in model.att_embedding.embedding_configs()}
    assert set(att) == {"item_att", "cate_att"} and all(c.embedding_dim == 4 for c in att.values())
    assert behavior_feature in att["item_att"].feature_names
    assert model.features() == build(info, name).features()  # the loader delivers the same features
    batch = batches(info, model, 1)[0]
    model.eval()
    with torch.no_grad():
        before = model(batch).logit
        model.att_embedding.embeddings["item_att"].weight.mul_(3.0)
        assert not torch.allclose(before, model(batch).logit)
    table = model.att_embedding.embeddings["cate_att"].weight
    start = table.detach().clone()
    losses = train_steps(model, batches(info, model, 3))
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(start, table.detach())
    assert {id(p) for p in model.sparse_parameters()} >= {id(table), id(model.embedding.embeddings["item"].weight)}
