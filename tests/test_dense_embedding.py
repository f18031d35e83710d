"""`DenseEmbedding` against ``nn.Embedding``: the same look-up, the same gradient (padding row included), the same
state dict; its own path only where it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctr import native
from ctr.modules.dense_embedding import DenseEmbedding


def _pair(rows: int, dim: int, padding_idx: int | None) -> tuple[nn.Embedding, DenseEmbedding]:
    torch.manual_seed(0)
    ref = nn.Embedding(rows, dim, padding_idx=padding_idx)
    ours = DenseEmbedding(rows, dim, padding_idx=padding_idx)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize(("rows", "dim", "padding_idx"), [(32, 8, 0), (256, 8, None), (9, 4, -1), (500, 1, None)])
def test_same_values_and_gradients(rows: int, dim: int, padding_idx: int | None) -> None:
    ref, ours = _pair(rows, dim, padding_idx)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, rows, (17, 23), generator=gen)
    idx[0, :5] = 0
    idx[1, :5] = rows - 1  # the padding row, when it is the last
    upstream = torch.randn(17, 23, dim, generator=gen)
    a, b = ref(idx), ours(idx)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    a.backward(upstream)
    b.backward(upstream)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    if ref.padding_idx is not None:
        assert ours.padding_idx == ref.padding_idx
        assert bool((ours.weight.grad[ref.padding_idx] == 0).all())
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_its_backward_runs_on_the_cpu_training_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = native._GatherRows.apply

    def counting(*args: object) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(native._GatherRows, "apply", counting)
    emb = DenseEmbedding(10, 3)
    idx = torch.tensor([[1, 2], [3, 1]])
    emb(idx).sum().backward()
    assert calls == [1]
    with torch.no_grad():
        emb(idx)  # no gradient: nn.Embedding's own look-up
    DenseEmbedding(10, 3, max_norm=1.0)(idx)  # max_norm renormalizes rows in place: nn.Embedding's path
    assert calls == [1]
    # the unused row's gradient is an explicit zero, as nn.Embedding's dense gradient is
    assert emb.weight.grad is not None and bool((emb.weight.grad[0] == 0).all())


def test_out_of_range_ids_are_refused() -> None:
    emb = DenseEmbedding(4, 2)
    with pytest.raises(IndexError):
        emb(torch.tensor([4]))
    with pytest.raises((IndexError, RuntimeError)):
        emb(torch.tensor([-1]))
