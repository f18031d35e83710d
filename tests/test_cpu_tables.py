"""`ctr.train.cpu_tables` against FBGEMM's own CPU kernels: the same look-ups, weights and optimizer states."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
    WeightDecayMode,
)

from ctr import native
from ctr.train import cpu_tables

DIM = 8
ROWS = (50, 7)  # two tables; features 0 and 1 share table 0, feature 2 reads table 1
FEATURE_TABLE_MAP = [0, 0, 1]


def _tbe(optimizer: OptimType, pooling: PoolingMode = PoolingMode.NONE, **kw) -> SplitTableBatchedEmbeddingBagsCodegen:
    torch.manual_seed(0)
    specs = [(r, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for r in ROWS]
    return SplitTableBatchedEmbeddingBagsCodegen(
        specs, feature_table_map=FEATURE_TABLE_MAP, optimizer=optimizer, pooling_mode=pooling, learning_rate=0.1,
        eps=1e-3, **kw,
    )  # fmt: skip


def _batch(step: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths per (feature, sample) with an empty sample and, at step 1, an empty feature; ids repeat."""
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 6, (len(FEATURE_TABLE_MAP), batch), generator=g)
    lengths[0, 1] = 0
    if step == 1:
        lengths[2] = 0
    ids = [torch.randint(0, ROWS[t] // 3, (int(lengths[f].sum()),), generator=g) for f, t in
           enumerate(FEATURE_TABLE_MAP)]  # fmt: skip
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.flatten().cumsum(0)])
    return torch.cat(ids), offsets


@pytest.mark.parametrize(
    ("optimizer", "kw"),
    [
        (OptimType.EXACT_ADAGRAD, {}),
        (OptimType.EXACT_SGD, {}),
        (OptimType.EXACT_ROWWISE_ADAGRAD, {}),
        (OptimType.EXACT_ROWWISE_ADAGRAD, {"weight_decay": 0.05, "weight_decay_mode": WeightDecayMode.L2}),
        (OptimType.EXACT_ROWWISE_ADAGRAD, {"weight_decay": 0.05, "weight_decay_mode": WeightDecayMode.DECOUPLE}),
    ],
)
def test_same_lookups_weights_and_states_as_fbgemm(optimizer, kw):
    ref = _tbe(optimizer, **kw)
    ours = copy.deepcopy(ref)
    assert cpu_tables.install_tbe(ours)
    for step in range(5):
        indices, offsets = _batch(step)
        out_ref, out = ref(indices, offsets), ours(indices, offsets)
        exact = step == 0  # a copy of the same rows; after updates, the sums' order differs (float rounding)
        torch.testing.assert_close(out, out_ref, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + step))
        out_ref.backward(grad)
        out.backward(grad)
        torch.testing.assert_close(ours.weights_host, ref.weights_host, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.momentum1_host, ref.momentum1_host, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.weights_host, _tbe(optimizer, **kw).weights_host)  # it trained


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD])
def test_the_distinct_rows_order_changes_no_value(optimizer, monkeypatch):
    """The update's distinct rows from the native hash table (first occurrence) or from ``torch.unique`` (sorted):
    each row's gradients are summed in look-up order either way, so weights and states are equal bit for bit."""
    from ctr import native

    tbes = []
    for use in (True, False):
        with monkeypatch.context() as m:
            if not use:
                m.setattr(native, "unique_inverse", lambda x: None)  # torch.unique's sorted rows instead
            tbe = _tbe(optimizer)
            assert cpu_tables.install_tbe(tbe)
            for step in range(4):
                indices, offsets = _batch(step)
                grad = torch.randn(int(offsets[-1]), DIM, generator=torch.Generator().manual_seed(100 + step))
                tbe(indices, offsets).backward(grad)
        tbes.append(tbe)
    assert torch.equal(tbes[0].weights_host, tbes[1].weights_host)
    assert torch.equal(tbes[0].momentum1_host, tbes[1].momentum1_host)


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD, OptimType.ADAM])
def test_momentum_rows_placed_by_lookup_are_the_weights_rows(optimizer, monkeypatch):
    """Where the momentum lies where the weights do (every TBE here) the update reads its rows as the distinct
    weight rows; placing them look-up by look-up (the general path) gives the same weights and states bit for bit."""
    hosts = []
    for shortcut in (True, False):
        with monkeypatch.context() as m:
            if not shortcut:
                init = cpu_tables._Rows.__init__

                def general(self, *a, _init=init, **kw):  # type: ignore[no-untyped-def]
                    _init(self, *a, **kw)
                    assert self.same_rows
                    self.same_rows = False

                m.setattr(cpu_tables._Rows, "__init__", general)
            tbe = _adam_tbe() if optimizer == OptimType.ADAM else _tbe(optimizer)
            assert cpu_tables.install_tbe(tbe)
            for step in range(4):
                indices, offsets = _batch(step)
                grad = torch.randn(int(offsets[-1]), DIM, generator=torch.Generator().manual_seed(100 + step))
                tbe(indices, offsets).backward(grad)
        hosts.append([t.clone() for t in (tbe.weights_host, tbe.momentum1_host, getattr(tbe, "momentum2_host", None))
                      if t is not None])  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(*hosts, strict=True))
    assert not torch.equal(hosts[0][0], _tbe(OptimType.EXACT_SGD).weights_host)


def test_the_native_adagrad_update_is_the_eager_one_on_any_thread_count():
    """`adagrad_rows` (one pass) against the update's eager operators (gathers, addcmul, sqrt, add, addcdiv,
    scatters) on blocks big enough to split over threads: the same values within a unit in the last place (PyTorch's
    float32 ``sqrt`` on the CPU is not always correctly rounded), the same bits on 1 and 2 threads, and the rows it
    does not name untouched."""
    from ctr import native

    gen = torch.Generator().manual_seed(7)
    weights, momentum = torch.randn(3000, 16, generator=gen), torch.rand(3000, 16, generator=gen)
    rows = torch.randperm(3000, generator=gen)[:2500]
    m_rows = torch.randperm(3000, generator=gen)[:2500]
    g = torch.randn(2500, 16, generator=gen) * 10.0 ** torch.randint(-4, 2, (2500, 1), generator=gen)
    lr, eps = 0.05, 1e-8
    w_eager, m_eager = weights.clone(), momentum.clone()
    m = m_eager.index_select(0, m_rows).addcmul_(g, g)
    m_eager.index_copy_(0, m_rows, m)
    w_eager.index_copy_(0, rows, w_eager.index_select(0, rows).addcdiv_(g, m.sqrt().add_(eps), value=-lr))
    assert native.available()
    results, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            w, mom = weights.clone(), momentum.clone()
            torch.ops.ctr_native.adagrad_rows(w, mom, rows, m_rows, g, lr, eps)
            results.append((w, mom))
    finally:
        torch.set_num_threads(before)
    for w, mom in results:
        torch.testing.assert_close(w, w_eager, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mom, m_eager, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    untouched = torch.ones(3000, dtype=torch.bool).index_fill_(0, rows, False)
    assert torch.equal(results[0][0][untouched], weights[untouched]) and not torch.equal(results[0][0], weights)
    with pytest.raises(RuntimeError, match="outside the tables"):
        torch.ops.ctr_native.adagrad_rows(w, mom, rows + 1000, m_rows, g, lr, eps)


@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_the_native_adam_update_is_the_eager_one_on_any_thread_count(decay):
    """`adam_rows` (one pass) against `_adam_eager` (the update's fourteen eager operators) over several steps on
    blocks big enough to split over threads: the same moments bit for bit, the weights within float rounding
    (PyTorch's float32 ``sqrt`` on the CPU is not always correctly rounded), the same bits on 1 and 2 threads, the rows
    it does not name untouched, and a clear error for a row outside the tables."""
    from ctr import native

    gen = torch.Generator().manual_seed(11)
    start = (torch.randn(3000, 16, generator=gen), torch.zeros(3000, 16), torch.zeros(3000, 16))
    lr, eps, beta1, beta2 = 0.01, 1e-8, 0.9, 0.999
    steps = []
    for _ in range(3):
        rows = torch.randperm(3000, generator=gen)[:2500]
        m_rows = torch.randperm(3000, generator=gen)[:2500]
        steps.append(
            (
                rows,
                m_rows,
                torch.randn(2500, 16, generator=gen) * 10.0 ** torch.randint(-4, 2, (2500, 1), generator=gen),
            )
        )
    eager = [t.clone() for t in start]
    for step, (rows, m_rows, g) in enumerate(steps, start=1):
        cpu_tables._adam_eager(*eager, rows, m_rows, g, lr, eps, beta1, beta2, decay, step)
    assert native.available()
    results, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state = [t.clone() for t in start]
            for step, (rows, m_rows, g) in enumerate(steps, start=1):
                torch.ops.ctr_native.adam_rows(*state, rows, m_rows, g, lr, eps, beta1, beta2, decay, step)
            results.append(state)
    finally:
        torch.set_num_threads(before)
    for state in results:
        torch.testing.assert_close(state[0], eager[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(state[1], eager[1]) and torch.equal(state[2], eager[2])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    named = torch.zeros(3000, dtype=torch.bool)
    for rows, _, _ in steps:
        named[rows] = True
    assert torch.equal(results[0][0][~named], start[0][~named]) and not torch.equal(results[0][0], start[0])
    rows, m_rows, g = steps[0]
    with pytest.raises(RuntimeError, match="outside the tables"):
        torch.ops.ctr_native.adam_rows(*results[0], rows, m_rows + 1000, g, lr, eps, beta1, beta2, decay, 4)


def test_evaluation_and_unsupported_tables():
    ours = _tbe(OptimType.EXACT_ADAGRAD)
    before = ours.weights_host.detach().clone()
    assert cpu_tables.install_tbe(ours)
    with torch.no_grad():
        out = ours(*_batch(0))
    assert not out.requires_grad and torch.equal(ours.weights_host, before)
    # pooled tables and optimizers without this path keep FBGEMM's
    assert cpu_tables.supported(_tbe(OptimType.EXACT_ADAGRAD, PoolingMode.SUM)) is None
    assert cpu_tables.supported(_tbe(OptimType.EMAINPLACE_ROWWISE_ADAGRAD)) is None
    assert cpu_tables.supported(_tbe(OptimType.EXACT_ADAGRAD, output_dtype=SparseType.FP16)) is None


@pytest.mark.parametrize("native_on", [True, False])
def test_an_index_outside_its_table_is_a_clear_error(native_on, monkeypatch):
    monkeypatch.setattr(native, "_use", native_on)
    ours = _tbe(OptimType.EXACT_ADAGRAD)
    cpu_tables.install_tbe(ours)
    indices, offsets = _batch(0)
    indices[-1] = ROWS[1]  # the last look-up is feature 2's, into table 1
    with pytest.raises(IndexError, match=r"index 7 of feature #2 .* outside its table of 7 rows"):
        ours(indices, offsets)
    indices, offsets = _batch(2)
    indices[3] = -1  # feature 0's, the first bad one of two
    indices[-1] = ROWS[1]
    with pytest.raises(IndexError, match=r"index -1 of feature #0 \(position 3 "):
        ours(indices, offsets)


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD, OptimType.EXACT_SGD])
def test_the_lookups_places_are_the_same_natively_and_eager(optimizer, monkeypatch):
    """`lookup_rows` (one native pass) places every look-up where the eager form does, in the weights and in the
    momentum (per weight, per row, none), with an empty feature at step 1."""
    assert native.available()
    tbe = _tbe(optimizer)
    name = cpu_tables.supported(tbe)
    for step in range(3):
        indices, offsets = _batch(step)
        native_rows = cpu_tables._Rows(tbe, name, indices, offsets)
        monkeypatch.setattr(native, "_use", False)
        eager = cpu_tables._Rows(tbe, name, indices, offsets)
        monkeypatch.setattr(native, "_use", True)
        assert torch.equal(native_rows.weight, eager.weight) and torch.equal(native_rows.momentum, eager.momentum)
        assert native_rows.weight.numel() == int(offsets[-1])
    # the op alone, with bases that differ between the weights and the momentum (they coincide in the TBEs above)
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 9, 3])
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    table_rows, w_base, m_base = torch.tensor([4, 6, 8, 2]), torch.tensor([0, 4, 10, 18]), torch.tensor([3, 1, 7, 0])
    parts = [torch.randint(0, int(r), (int(c),), generator=g) for r, c in zip(table_rows, counts, strict=True)]
    indices = torch.cat(parts)
    weight, momentum, bad = cpu_tables._places(indices, bounds, table_rows, w_base, m_base)
    assert bad == -1
    assert torch.equal(weight, indices + w_base.repeat_interleave(counts))
    assert torch.equal(momentum, indices + m_base.repeat_interleave(counts))
    for pos, value in ((7, 8), (16, -2), (0, 4)):  # feature 2's upper edge, feature 3 below 0, feature 0's edge
        wrong = indices.clone()
        wrong[pos] = value
        assert cpu_tables._places(wrong, bounds, table_rows, w_base, m_base)[2] == pos


@pytest.mark.parametrize(("model", "nproc"), [("dien", 1), ("sum_pool", 2)])
def test_training_matches_fbgemms_kernels(tiny_data, tmp_path, model, nproc):
    """`ctr train` with the tables on this module's path and on FBGEMM's: the same model after the same steps (one
    rank, tables placed whole; two ranks, tables sharded by rows). The dense part trains with SGD here: Adam turns
    the rounding noise of a gradient that is zero in exact arithmetic (a bias before a batch norm) into steps of
    its full learning rate, which would compare the noise, not the update. The tables' Adagrad does the same, more
    mildly, to a weight whose gradients nearly cancel (DIEN's popular items, read as behaviors and drawn as
    negatives in one step: the two kernels sum the same terms in another order, and the step divides that sum by
    the root of its own squares), so the tables' weights are held to half a percent of one step of their learning
    rate, and the optimizer's states, where the kernels' arithmetic shows, to a relative 1e-3 down to 1e-14."""
    from ctr.config import resolve_train_config
    from ctr.train.checkpoint import latest_complete, load_rank
    from ctr.train.trainer import train

    states, lr = {}, 0.0
    for kernel in ("torch", "fbgemm"):
        sets = ["data.num_workers=0", "data.batch_size=64", "train.max_steps=6", "train.validation=false",
                "optim.dense=sgd", "optim.dense_lr=0.05", f"optim.sparse_cpu_kernel={kernel}"]  # fmt: skip
        cfg, _ = resolve_train_config(model, None, sets)
        lr = float(cfg.optim.sparse_lr)
        run = train(tiny_data, tmp_path / kernel, cfg, nproc=nproc)
        groups = json.loads((run / "train_summary.json").read_text())["cpu_table_groups"]
        assert (groups > 0) == (kernel == "torch"), (kernel, groups)
        found = latest_complete(run / "checkpoints")
        assert found is not None
        states[kernel] = [load_rank(found[0], r) for r in range(nproc)]
    compared = 0
    for rank in range(nproc):
        ours, ref = states["torch"][rank], states["fbgemm"][rank]
        for part in ("model", "sparse_opt"):
            for key, a, b in _tensors(ours[part], ref[part]):
                table = part == "model" and "embedding" in key
                rtol, atol = (1e-3, 1e-14) if part == "sparse_opt" else (1e-4, 5e-3 * lr if table else 1e-5)
                where = f"rank {rank} {key}"
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, w=where: f"{w}: {m}")
                compared += part == "sparse_opt" or table
    assert compared >= 2 * nproc  # the tables and their Adagrad states were among them


def _tensors(a: dict, b: dict, prefix: str = ""):
    """The floating-point tensors of two checkpoint parts, key by key (nested dicts, sharded tensors' local shard)."""
    assert a.keys() == b.keys(), prefix
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            yield from _tensors(x, y, f"{prefix}{key}.")
            continue
        x, y = (x[0], y[0]) if isinstance(x, list) else (x, y)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            yield prefix + key, x, y


def _train_din(data, root, name: str, sets: list[str], resume: bool = False) -> dict:
    """`ctr train` of DIN on the tiny world (small batches, SGD on the dense part, no validation): its last
    checkpoint's rank-0 state."""
    from ctr.config import resolve_train_config
    from ctr.train.checkpoint import latest_complete, load_rank
    from ctr.train.trainer import train

    base = ["data.num_workers=0", "data.batch_size=64", "train.validation=false", "optim.dense=sgd",
            "optim.dense_lr=0.05"]  # fmt: skip
    cfg, _ = resolve_train_config("din", None, base + sets)
    out = train(data, root / name, cfg, resume=resume)
    found = latest_complete(out / "checkpoints")
    assert found is not None
    return load_rank(found[0], 0)


def test_a_run_resumes_across_the_two_kernels(tiny_data, tmp_path):
    """Checkpoints hold the same tensors either way: four steps on FBGEMM's kernels, resumed for four more on this
    module's, end where eight straight steps on this module's do."""

    def run(name: str, sets: list[str], resume: bool = False) -> dict:
        return _train_din(tiny_data, tmp_path, name, sets, resume)

    straight = run("straight", ["train.max_steps=8"])
    run("switched", ["train.max_steps=4", "train.checkpoint_every=4", "optim.sparse_cpu_kernel=fbgemm"])
    resumed = run("switched", ["train.max_steps=8"], resume=True)
    assert straight["state"]["step"] == resumed["state"]["step"] == 8
    for part in ("model", "sparse_opt"):
        for key, a, b in _tensors(straight[part], resumed[part]):
            # atol 1e-4: Adagrad's step is lr * g / sqrt(sum g^2), so a row whose few gradients are near zero moves
            # by a rounding-sized difference in g times 1 / |g| (a wrong update would be off by about lr, 0.05)
            torch.testing.assert_close(
                a, b, rtol=1e-4, atol=1e-4, msg=lambda m, part=part, key=key: f"{part} {key}: {m}"
            )


# ---- Adam (FBGEMM has no CPU Adam: the reference is its GPU formula, written per row) ----------------------------
ADAM = {"beta1": 0.8, "beta2": 0.95, "eps": 1e-3}


def _adam_tbe(feature_table_map=FEATURE_TABLE_MAP, rows=ROWS, **kw) -> SplitTableBatchedEmbeddingBagsCodegen:
    torch.manual_seed(0)
    specs = [(r, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for r in rows]
    tbe = cpu_tables._adam_tbe(
        SplitTableBatchedEmbeddingBagsCodegen, specs, feature_table_map=feature_table_map, optimizer=OptimType.ADAM,
        pooling_mode=PoolingMode.NONE, learning_rate=0.1, **{**ADAM, **kw},
    )  # fmt: skip
    assert tbe.optimizer == OptimType.ADAM and cpu_tables.install_tbe(tbe)
    return tbe


class _ReferenceAdam:
    """FBGEMM's GPU Adam (`optimizers.py::adam`) on plain per-table tensors, one looked-up row at a time: the step
    count goes up once per step; a row's gradient is the sum over its look-ups; only those rows move."""

    def __init__(self, tbe, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0) -> None:
        self.tables = [w.detach().clone() for w in tbe.split_embedding_weights()]
        self.m1 = [torch.zeros_like(w) for w in self.tables]
        self.m2 = [torch.zeros_like(w) for w in self.tables]
        self.hp = (lr, beta1, beta2, eps, weight_decay)
        self.t = 0

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        per_feature = (offsets.numel() - 1) // len(FEATURE_TABLE_MAP)
        table_of = [FEATURE_TABLE_MAP[i // per_feature] for i in range(offsets.numel() - 1)]
        return torch.stack(
            [
                self.tables[table_of[bag]][int(indices[j])]
                for bag in range(offsets.numel() - 1)
                for j in range(offsets[bag], offsets[bag + 1])
            ]
        )

    def step(self, indices: torch.Tensor, offsets: torch.Tensor, grad: torch.Tensor) -> None:
        lr, beta1, beta2, eps, decay = self.hp
        self.t += 1
        per_feature = (offsets.numel() - 1) // len(FEATURE_TABLE_MAP)
        sums: dict[tuple[int, int], torch.Tensor] = {}
        n = 0
        for bag in range(offsets.numel() - 1):
            table = FEATURE_TABLE_MAP[bag // per_feature]
            for j in range(int(offsets[bag]), int(offsets[bag + 1])):
                key = (table, int(indices[j]))
                sums[key] = sums.get(key, 0) + grad[n]
                n += 1
        for (table, row), g in sums.items():
            m = self.m1[table][row] = beta1 * self.m1[table][row] + (1 - beta1) * g
            v = self.m2[table][row] = beta2 * self.m2[table][row] + (1 - beta2) * g * g
            w = self.tables[table][row]
            m_hat, v_hat = m / (1 - beta1**self.t), v / (1 - beta2**self.t)
            self.tables[table][row] = w - lr * (m_hat / (v_hat.sqrt() + eps) + decay * w)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_is_fbgemms_gpu_adam_row_by_row(weight_decay):
    ours = _adam_tbe(weight_decay=weight_decay)
    ref = _ReferenceAdam(ours, lr=0.1, weight_decay=weight_decay, **ADAM)
    for step in range(5):
        indices, offsets = _batch(step)
        out = ours(indices, offsets)
        torch.testing.assert_close(out, ref.lookup(indices, offsets), rtol=1e-5, atol=1e-6)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + step))
        out.backward(grad)
        ref.step(indices, offsets, grad)
        states = ours.split_optimizer_states()
        for t in range(len(ROWS)):
            torch.testing.assert_close(ours.split_embedding_weights()[t], ref.tables[t], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(states[t][0].view(-1, DIM), ref.m1[t], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(states[t][1].view(-1, DIM), ref.m2[t], rtol=1e-5, atol=1e-7)
    assert int(ours.iter) == 5
    assert [sorted(s) for s in ours.get_optimizer_state()] == [["exp_avg", "exp_avg_sq"]] * len(ROWS)
    assert "iter" in ours.state_dict() and "momentum2_host" in ours.state_dict()


def test_adam_agrees_with_torch_sparse_adam():
    """An independent implementation: `torch.optim.SparseAdam` on an `nn.Embedding(sparse=True)` adds eps to
    sqrt(v) before the bias correction, FBGEMM after it; with eps tiny the two are the same update."""
    eps = 1e-10
    ours = _adam_tbe(feature_table_map=[0], rows=(40,), eps=eps)
    emb = torch.nn.Embedding(40, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(ours.split_embedding_weights()[0])
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.1, betas=(ADAM["beta1"], ADAM["beta2"]), eps=eps)
    g = torch.Generator().manual_seed(7)
    for step in range(6):
        indices = torch.randint(0, 12, (30,), generator=g)
        offsets = torch.arange(0, 31, 3)
        grad = torch.randn(30, DIM, generator=g)
        ours(indices, offsets).backward(grad)
        opt.zero_grad()
        emb(indices).backward(grad)
        opt.step()
        torch.testing.assert_close(ours.split_embedding_weights()[0], emb.weight.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, step=step: f"step {step}: {m}")  # fmt: skip


def test_adam_without_this_path_is_an_error_not_fbgemms_crash():
    with pytest.raises(ValueError, match=r"optim.sparse=adam on the CPU.*How to fix"):
        cpu_tables.install_tbe(
            cpu_tables._adam_tbe(
                SplitTableBatchedEmbeddingBagsCodegen, [(10, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                optimizer=OptimType.ADAM, pooling_mode=PoolingMode.SUM,
            )
        )  # fmt: skip


def test_training_with_adam_tables_on_the_cpu_resumes_exactly(tiny_data, tmp_path):
    """`ctr train` with optim.sparse=adam on the CPU: the tables train, the checkpoint holds Adam's two moments
    under TorchRec's names and each table group's step count, and four steps resumed for four more end where eight
    straight steps do (a step count restarted at 0 would make the first resumed steps about 3x too large)."""
    adam = ["optim.sparse=adam", "optim.sparse_lr=0.01"]

    def run(name: str, sets: list[str], resume: bool = False) -> dict:
        return _train_din(tiny_data, tmp_path, name, adam + sets, resume)

    straight = run("straight", ["train.max_steps=8"])
    run("resumed", ["train.max_steps=4", "train.checkpoint_every=4"])
    resumed = run("resumed", ["train.max_steps=8"], resume=True)
    names = {k.rsplit(".", 1)[-1] for state in straight["sparse_opt"].values() for k in state}
    assert names == {"momentum1", "exp_avg_sq"}, names  # TorchRec's names for Adam's two moments, as on a GPU
    compared = 0
    for part in ("model", "sparse_opt"):
        for key, a, b in _tensors(straight[part], resumed[part]):
            torch.testing.assert_close(
                a, b, rtol=1e-4, atol=1e-5, msg=lambda m, part=part, key=key: f"{part} {key}: {m}"
            )
            compared += part == "sparse_opt"
    assert compared >= 2
    assert straight["table_steps"] == resumed["table_steps"] and set(straight["table_steps"]) == {8}
