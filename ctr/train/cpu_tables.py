"""The CPU training path of TorchRec's unpooled (sequence) tables: the look-up and the fused sparse update in torch.

TorchRec trains an `EmbeddingCollection` through FBGEMM's table-batched embedding (TBE) with the optimizer fused
into backward. On the CPU, FBGEMM's backward for unpooled look-ups (`split_embedding_nobag_backward_codegen_*_cpu`)
accumulates each row's gradient in a serial loop over two nested `std::unordered_map`s holding one `std::vector`
per distinct row: its cost is about 1 µs per distinct row looked up, on one thread. A batch of 1,024 samples with 50
behaviors each looks up 20K to 40K distinct items, and DIEN's negatives as many again: 13 ms of DIN's 76 ms step and
44 ms of DIEN's 185 on the demo world at L = 50 (`benchmarks/results/step-profile-demo-L50.json`); FBGEMM's backward
alone over 42,000 look-ups of 28,356 distinct rows took 31 ms against 3 ms for the same update written as sorted
tensor operations (`torch.unique`, `index_add_`, one pass of the optimizer over the distinct rows). Those are now
`native.unique_inverse` (the distinct rows through a hash table: no sort) and `native.index_add_rows` (one pass in
look-up order) where the native operators are built, PyTorch's otherwise.

`install(module)` gives every CPU TBE of `module` that trains unpooled float32 tables with exact Adagrad, exact
row-wise Adagrad, exact SGD or Adam a forward that looks rows up with `index_select` and a backward that applies the
same update to the same state tensors (`weights_host`, `momentum1_host`, Adam's `momentum2_host`), so TorchRec's
fused optimizer, its state dict and our checkpoints see no difference. The update is FBGEMM's CPU update, term for
term (its `split_weight_update_cpu` for each optimizer); only the order in which a row's gradients are summed
differs (float rounding). `tests/test_cpu_tables.py` holds the outputs, weights and optimizer states equal to
FBGEMM's own kernel's over several steps, with repeated rows, tables shared by two features, several tables, empty
features and row-wise sharding. Any other TBE (GPU, pooled, another optimizer or dtype, weighted or variable-batch
look-ups) keeps FBGEMM's path.

Adam (`optim.sparse=adam`) has no CPU kernel in FBGEMM at all: its TBE refuses Adam on the CPU at construction.
`cpu_adam()` lets TorchRec build such a TBE anyway (built as exact Adagrad, whose per-weight `momentum1` is Adam's
first moment, then given Adam's second moment, its persistent step counter and its optimizer type, so TorchRec's
fused optimizer holds and names both moments as it does on a GPU), and this module's update is FBGEMM's
GPU Adam (`codegen/genscript/optimizers.py::adam`), term for term: lazy (only the rows looked up in the step move),
bias-corrected by the table group's step count, ``w -= lr (m̂ / (sqrt(v̂) + eps) + weight_decay w)``. Its reference
in `tests/test_cpu_tables.py` is that formula written per row, and `torch.optim.SparseAdam` (the same update up to
where eps enters) agrees with it. Exact Adagrad and Adam run as one native pass over the distinct rows where the
native operators are built (`adagrad_rows`, `adam_rows`), their eager operators otherwise. Where each look-up lies
in the flat buffers (with the indices' bounds check) is one native pass too (`lookup_rows`), and the distinct rows'
momentum rows are the rows themselves wherever the momentum lies where the weights do (every TBE built here).
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .. import native

log = logging.getLogger(__name__)

UPDATE_SPAN = "ctr::cpu_table_update"  # the profiler span of the update (benchmarks/step_profile.py reads it)


def _optim_names() -> dict[Any, str]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType

    return {
        OptimType.EXACT_ADAGRAD: "adagrad",
        OptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad",
        OptimType.EXACT_SGD: "sgd",
        OptimType.ADAM: "adam",
    }


def _adam_tbe(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``cls(*args, **kwargs)`` (TorchRec's call of the TBE class); on the CPU with Adam, the TBE described in the
    module docstring: built with exact Adagrad (FBGEMM's CPU mode accepts it), then made an Adam TBE."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, construct_split_state

    specs = kwargs.get("embedding_specs", args[0] if args else None)
    on_cpu = specs is not None and all(spec[3] == ComputeDevice.CPU for spec in specs)
    if kwargs.get("optimizer") != OptimType.ADAM or not on_cpu:
        return cls(*args, **kwargs)
    tbe = cls(*args, **{**kwargs, "optimizer": OptimType.EXACT_ADAGRAD})
    tbe._apply_split(
        construct_split_state(tbe.embedding_specs, rowwise=False, cacheable=False), prefix="momentum2",
        dtype=torch.float32,  # type: ignore[arg-type]
    )  # fmt: skip
    tbe.register_buffer("iter", tbe.iter, persistent=True)  # Adam's step count, kept with the table as on a GPU
    tbe.optimizer = OptimType.ADAM
    return tbe


@contextlib.contextmanager
def cpu_adam() -> Iterator[None]:
    """While open, TorchRec builds CPU TBEs with Adam as this module's Adam TBEs (see the module docstring); `install`
    must then take every one of them (FBGEMM has no CPU forward for them)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    from torchrec.distributed import batched_embedding_kernel as kernel

    assert kernel.SplitTableBatchedEmbeddingBagsCodegen is SplitTableBatchedEmbeddingBagsCodegen, "already open"
    kernel.SplitTableBatchedEmbeddingBagsCodegen = lambda *a, **kw: _adam_tbe(  # type: ignore[misc,assignment]
        SplitTableBatchedEmbeddingBagsCodegen, *a, **kw
    )
    try:
        yield
    finally:
        kernel.SplitTableBatchedEmbeddingBagsCodegen = SplitTableBatchedEmbeddingBagsCodegen  # type: ignore[misc]


def supported(tbe: Any) -> str | None:
    """The update this module applies for `tbe`, or None where FBGEMM's own path must stay (and why, logged)."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

    name = _optim_names().get(tbe.optimizer)
    reasons = []
    if not tbe.use_cpu:
        reasons.append("not on the CPU")
    if tbe.pooling_mode != PoolingMode.NONE:
        reasons.append("pooled")
    if name is None:
        reasons.append(f"optimizer {tbe.optimizer}")
    if tbe.weights_host.dtype != torch.float32 or tbe.weights_host.numel() == 0:
        reasons.append(f"weights {tbe.weights_host.dtype} on the host: {tbe.weights_host.numel()} values")
    if int(tbe.output_dtype) != SparseType.FP32.as_int():
        reasons.append(f"output dtype {tbe.output_dtype}")
    if len(set(torch.diff(tbe.D_offsets).tolist())) > 1:
        reasons.append("features of different widths")
    if name == "rowwise_adagrad" and int(tbe.optimizer_args.weight_decay_mode) not in (0, 1, 2, 5):
        reasons.append(f"weight_decay_mode {tbe.optimizer_args.weight_decay_mode}")
    if name == "adam" and not torch.equal(tbe.momentum1_offsets, getattr(tbe, "momentum2_offsets", torch.empty(0))):
        reasons.append("Adam's moments laid out differently")
    if reasons:
        if name == "adam" and tbe.use_cpu:  # FBGEMM has no CPU path to fall back to
            raise ValueError(
                f"optim.sparse=adam on the CPU: a table group cannot train here ({', '.join(reasons)}); FBGEMM has "
                "no CPU Adam. How to fix: optim.sparse=adagrad or rowwise_adagrad, or train on a GPU"
            )
        log.debug("TBE keeps FBGEMM's path: %s", ", ".join(reasons))
        return None
    return name


def _places(
    indices: torch.Tensor, bounds: torch.Tensor, table_rows: torch.Tensor, w_base: torch.Tensor, m_base: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """A TBE's look-ups (feature f's at ``bounds[f]:bounds[f + 1]``) placed in its flat weights (``indices +
    w_base[f]``) and momentum (``+ m_base[f]``), and the first outside ``[0, table_rows[f])`` (-1: none), in one
    native pass (`lookup_rows` in ``index_add.cpp``); None where `_Rows` runs the eager form."""
    if not native.applies():  # (no float tensors to check: built, switched on, not compiling)
        return None
    args = (t.to(torch.int64).contiguous() for t in (indices, bounds, table_rows, w_base, m_base))
    weight, momentum, bad = torch.ops.ctr_native.lookup_rows(*args)
    return weight, momentum, int(bad)


class _Rows:
    """Where each looked-up index lives in the TBE's flat weight and momentum buffers."""

    def __init__(self, tbe: Any, name: str, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        n_features = len(tbe.feature_table_map)
        dim = int(tbe.D_offsets[1] - tbe.D_offsets[0])
        batch = (offsets.numel() - 1) // n_features
        bounds = offsets[::batch] if batch else offsets.new_zeros(n_features + 1)
        indices = indices[: int(bounds[-1])].long()
        table_rows, w_base, m_base = _bases(tbe, name, dim)
        found = _places(indices, bounds, table_rows, w_base, m_base)  # one pass where built
        if found is not None:
            weight, momentum, i = found
        else:
            per_lookup = torch.stack([table_rows, w_base, m_base], dim=1).repeat_interleave(
                torch.diff(bounds), dim=0, output_size=indices.numel()
            )
            bad = (indices < 0) | (indices >= per_lookup[:, 0])
            i = int(bad.nonzero()[0]) if bool(bad.any()) else -1
            weight, momentum = indices + per_lookup[:, 1], indices + per_lookup[:, 2]
        if i >= 0:
            f = int(torch.searchsorted(bounds[1:].contiguous(), i, right=True))
            raise IndexError(
                f"embedding look-up: index {int(indices[i])} of feature #{f} (position {i} of the batch's look-ups) is "
                f"outside its table of {int(table_rows[f])} rows. The ids fed to the tables must be in [0, rows): "
                "check the dataset's vocab sizes against the model's tables (rebuild the dataset or the config)"
            )
        self.name, self.dim = name, dim
        self.weight, self.momentum = weight, momentum
        self.same_rows = tbe._ctr_same_rows  # the momentum's rows are the weights' (`momentum` = `weight`)


def _bases(tbe: Any, name: str, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per feature of `tbe`: its table's rows, its first row in the flat weights and in the flat momentum (exact
    Adagrad keeps a value per weight, row-wise Adagrad one per row, SGD none), as int64; fixed for a TBE, so built
    on its first look-up and kept (with whether the two bases agree, ``_ctr_same_rows``)."""
    bases = getattr(tbe, "_ctr_bases", None)
    if bases is None:
        per = {"adagrad": dim, "adam": dim, "rowwise_adagrad": 1}.get(name)
        table_rows = torch.tensor([tbe.embedding_specs[t][0] for t in tbe.feature_table_map], dtype=torch.int64)
        w_base = (tbe.weights_offsets // dim).to(torch.int64).contiguous()
        m_base = (tbe.momentum1_offsets // per).to(torch.int64).contiguous() if per else w_base
        bases = tbe._ctr_bases = (table_rows, w_base, m_base)
        tbe._ctr_same_rows = torch.equal(w_base, m_base)
    return bases


def _index_add_blocks(
    srcs: Sequence[torch.Tensor | None], sizes: Sequence[int], index: torch.Tensor, rows: int, d: int
) -> torch.Tensor:
    """`native.index_add_rows` of the blocks' rows in order (block k: ``sizes[k]`` rows of ``d`` floats, any shape;
    None adds nothing but binds its ``sizes[k]`` indices): the look-up's gradients as its outputs left them, not
    concatenated first (`index_add_blocks` in ``index_add.cpp``); PyTorch's on the concatenation where it does not
    apply."""
    parts = [s.reshape(-1, d) for s in srcs if s is not None]
    if index.dim() == 1 and index.device.type == "cpu" and native.applies(*parts):
        blocks = [None if s is None else s.reshape(-1, d).contiguous() for s in srcs]
        return torch.ops.ctr_native.index_add_blocks(blocks, list(sizes), index.to(torch.int64).contiguous(), rows, d)
    ref = next(iter(parts), index.new_zeros(0, d, dtype=torch.float32))
    full = torch.cat([ref.new_zeros(n, d) if s is None else s.reshape(-1, d) for s, n in zip(srcs, sizes, strict=True)])
    return full.new_zeros(rows, d).index_add_(0, index, full)


def _update(tbe: Any, rows: _Rows, grads: Sequence[torch.Tensor | None], sizes: Sequence[int]) -> None:
    """FBGEMM's CPU update (`rows.name`), applied to each distinct row once with the sum of its gradients; the
    look-ups' gradients come in blocks of ``sizes`` rows in look-up order (None: a block without gradient, zeros)."""
    with torch.no_grad(), torch.profiler.record_function(UPDATE_SPAN):
        name = rows.name
        found = native.unique_inverse(rows.weight)  # the distinct rows, without a sort
        unique, inverse = found if found is not None else torch.unique(rows.weight, return_inverse=True)
        grads = [None if g is None else g.float() for g in grads]
        # one pass in look-up order, not index_add_'s sort of the index, nor a concatenation of the blocks
        g = _index_add_blocks(grads, sizes, inverse, unique.numel(), rows.dim)
        weights = tbe.weights_host.view(-1, rows.dim)
        lr = float(tbe.learning_rate_tensor)
        if name == "sgd":
            weights.index_copy_(0, unique, weights.index_select(0, unique).add_(g, alpha=-lr))
            return
        # each distinct row's momentum row: the row itself where every feature's momentum lies where its weights do
        # (per-weight and per-row momentum alike, in every TBE TorchRec builds here), else placed by look-up
        m_rows = unique if rows.same_rows else torch.empty_like(unique).index_copy_(0, inverse, rows.momentum)
        eps = float(tbe.optimizer_args.eps)
        if name == "adagrad":
            momentum = tbe.momentum1_host.view(-1, rows.dim)
            if native.applies(weights, momentum, g):  # the same step in one pass (`index_add.cpp`)
                torch.ops.ctr_native.adagrad_rows(weights, momentum, unique, m_rows, g.contiguous(), lr, eps)
                return
            m = momentum.index_select(0, m_rows).addcmul_(g, g)
            momentum.index_copy_(0, m_rows, m)
            w = weights.index_select(0, unique)
            weights.index_copy_(0, unique, w.addcdiv_(g, m.sqrt().add_(eps), value=-lr))
            return
        if name == "adam":
            _adam(tbe, weights, unique, m_rows, g.contiguous(), lr, eps)
            return
        w = weights.index_select(0, unique)
        # row-wise Adagrad, with FBGEMM's weight decay modes (1: L2 in the gradient's square; 2 and 5: decoupled)
        mode = int(tbe.optimizer_args.weight_decay_mode)
        decay = float(tbe.optimizer_args.weight_decay)
        g_sq = (g + decay * w) if mode == 1 else g
        m = tbe.momentum1_host.index_select(0, m_rows) + g_sq.square().mean(dim=1)
        tbe.momentum1_host.index_copy_(0, m_rows, m)
        multiplier = lr / (m.sqrt() + eps)
        if mode == 1:
            correction = 1.0 - multiplier * decay
        elif mode in (2, 5):
            correction = torch.full_like(multiplier, 1.0 - lr * decay)
        else:
            correction = torch.ones_like(multiplier)
        weights.index_copy_(0, unique, w.mul_(correction[:, None]).sub_(g * multiplier[:, None]))


def _adam(
    tbe: Any, weights: torch.Tensor, unique: torch.Tensor, m_rows: torch.Tensor, g: torch.Tensor, lr: float, eps: float
) -> None:
    """FBGEMM's (GPU) Adam on the distinct rows ``unique``: moments of those rows only, bias correction by the
    group's step count (one per backward, as FBGEMM counts one per training forward); in one native pass
    (`adam_rows` in ``index_add.cpp``) where it applies, else `_adam_eager`."""
    args = tbe.optimizer_args
    hp = (float(args.beta1), float(args.beta2), float(args.weight_decay))
    step = int(tbe.iter.add_(1))
    m1, m2 = tbe.momentum1_host.view(-1, g.shape[1]), tbe.momentum2_host.view(-1, g.shape[1])
    if native.applies(weights, m1, m2, g):
        torch.ops.ctr_native.adam_rows(weights, m1, m2, unique, m_rows, g, lr, eps, *hp, step)
    else:
        _adam_eager(weights, m1, m2, unique, m_rows, g, lr, eps, *hp, step)


def _adam_eager(
    weights: torch.Tensor,
    m1: torch.Tensor,
    m2: torch.Tensor,
    unique: torch.Tensor,
    m_rows: torch.Tensor,
    g: torch.Tensor,
    lr: float,
    eps: float,
    beta1: float,
    beta2: float,
    decay: float,
    step: int,
) -> None:
    """Adam's step at `step` on the rows ``unique`` of `weights` (moments at ``m_rows`` of `m1`, `m2`), in PyTorch's
    operators: the readable form of `adam_rows`, and its reference in tests/test_cpu_tables.py."""
    w = weights.index_select(0, unique)
    m = m1.index_select(0, m_rows).mul_(beta1).add_(g, alpha=1 - beta1)
    v = m2.index_select(0, m_rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m1.index_copy_(0, m_rows, m)
    m2.index_copy_(0, m_rows, v)
    denom = v.div_(1 - beta2**step).sqrt_().add_(eps)
    step_dir = m.div_(1 - beta1**step).div_(denom)
    if decay:
        step_dir.add_(w, alpha=decay)
    weights.index_copy_(0, unique, w.sub_(step_dir, alpha=lr))


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, placeholder: torch.Tensor, tbe: Any, rows: _Rows) -> torch.Tensor:  # noqa: ARG004
        ctx.tbe, ctx.rows = tbe, rows
        return tbe.weights_host.detach().view(-1, rows.dim).index_select(0, rows.weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        _update(ctx.tbe, ctx.rows, [grad], [ctx.rows.weight.numel()])
        return None, None, None


class _BlockLookup(torch.autograd.Function):
    """`_Lookup` with its rows as several outputs, one per block of consecutive look-ups (``sizes``): each reader's
    gradient reaches the update where it lies, without the concatenation a split of one output costs backward."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        placeholder: torch.Tensor,
        tbe: Any,
        rows: _Rows,
        sizes: list[int],  # noqa: ARG004
    ) -> tuple[torch.Tensor, ...]:
        ctx.tbe, ctx.rows, ctx.sizes = tbe, rows, sizes
        weights = tbe.weights_host.detach().view(-1, rows.dim)
        return tuple(weights.index_select(0, part) for part in rows.weight.split(sizes))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, None, None, None]:
        _update(ctx.tbe, ctx.rows, grads, ctx.sizes)
        return None, None, None, None


def lookup_blocks(
    tbe: Any, indices: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor | None, sizes: list[int]
) -> tuple[torch.Tensor, ...] | None:
    """The rows of a TBE this module trains (`install_tbe`; else None) in blocks: its look-ups (``indices`` and
    ``offsets`` as its forward takes them) taken in ``order`` (a permutation of their positions; None: as they come)
    and cut into blocks of ``sizes`` rows, each ``[sizes[k], D]``. The update is the TBE's, on the same rows: each
    distinct row's gradients are summed in their order in ``order``
    (`ctr.train.local_lookup` lays item and category rows out side by side, ``[n, 2D]``, this way)."""
    name = getattr(tbe, "_ctr_update", None)
    if not name:
        return None
    rows = _Rows(tbe, name, indices, offsets.long())
    if order is not None:
        rows.weight = rows.weight.index_select(0, order)
        # (the momentum's places are read only where they are not the weights' own rows: `_update`'s m_rows)
        rows.momentum = rows.weight if rows.same_rows else rows.momentum.index_select(0, order)
    return _BlockLookup.apply(tbe.placeholder_autograd_tensor, tbe, rows, sizes)


def _forward(self: Any, indices: torch.Tensor, offsets: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plain = not args and all(v is None for v in kwargs.values())
    if not plain:  # weighted, variable-batch or any other extra input: FBGEMM's own path
        return self._ctr_fbgemm_forward(indices, offsets, *args, **kwargs)
    rows = _Rows(self, self._ctr_update, indices, offsets.long())
    return _Lookup.apply(self.placeholder_autograd_tensor, self, rows)


def tbes(module: torch.nn.Module) -> list[Any]:
    """Every FBGEMM TBE under `module`. TorchRec keeps them in plain lists (a sharded collection's `_lookups`, each
    lookup's `_emb_modules`), outside `module.modules()`."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    found: list[Any] = []
    for m in module.modules():
        for lookup in getattr(m, "_lookups", None) or []:
            for emb in getattr(lookup, "_emb_modules", None) or []:
                tbe = getattr(emb, "_emb_module", None)
                if isinstance(tbe, SplitTableBatchedEmbeddingBagsCodegen) and all(tbe is not t for t in found):
                    found.append(tbe)
    return found


def install_tbe(tbe: Any) -> bool:
    """Give `tbe` this module's look-up and update where `supported`; True if it has them now."""
    if getattr(tbe, "_ctr_update", None):
        return True
    name = supported(tbe)
    if name is None:
        return False
    tbe._ctr_fbgemm_forward = tbe.forward
    tbe._ctr_update = name
    tbe.forward = types.MethodType(_forward, tbe)
    return True


def install(module: torch.nn.Module) -> int:
    """`install_tbe` on every TBE under `module`; returns how many now train through this module."""
    n = sum(install_tbe(tbe) for tbe in tbes(module))
    if n:
        log.info("%d CPU embedding table group(s) train through ctr.train.cpu_tables (FBGEMM's update, in torch)", n)
    return n
