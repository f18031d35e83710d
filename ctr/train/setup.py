"""The pieces a training rank is assembled from: optimizers, seeding, loader settings, the padding batch, and the
fault injection the resume tests use."""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from features.dataset import DatasetInfo
from features.loader import Batch, LoaderConfig, SplitLoader, loader_workers

from ..config import ConfigError, TrainConfig
from ..models import CTRModel
from .distributed import DistContext

log = logging.getLogger(__name__)

SPARSE_OPTIMIZERS = {"adagrad": "Adagrad", "sgd": "SGD", "adam": "Adam", "rowwise_adagrad": "RowWiseAdagrad"}


def sparse_optimizer_class(name: str) -> type:
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad
    return getattr(torch.optim, SPARSE_OPTIMIZERS[name])


def check_sparse_optimizer(name: str, cuda: bool | None = None, cpu_kernel: str = "torch") -> None:
    """FBGEMM's CPU embedding kernels have no Adam (their fused optimizers there: exact Adagrad, row-wise Adagrad
    and SGD); ours (`ctr.train.cpu_tables`, `optim.sparse_cpu_kernel=torch`) have. Fail before any rank starts, not
    in FBGEMM's assertion inside the first rank's model build."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "adam" and not cuda and cpu_kernel != "torch":
        raise ConfigError(
            f"optim.sparse=adam with optim.sparse_cpu_kernel={cpu_kernel}: FBGEMM's CPU embedding kernels have no "
            "fused Adam (on the CPU they train tables with adagrad, rowwise_adagrad or sgd). How to fix: "
            "optim.sparse_cpu_kernel=torch (ours, which has Adam), another optim.sparse, or train on a GPU"
        )


def dense_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The dense parameters' optimizer, in PyTorch's fused form where it has one for these parameters.

    PyTorch picks its per-parameter loop on the CPU (it defaults to the multi-tensor forms on CUDA only): for TWIN's
    24 dense tensors that was about 240 small operators a step, 1.2 ms, against 0.3 ms fused (same update, float
    rounding aside). Fused Adam, AdamW and SGD run on the CPU and CUDA; fused Adagrad on the CPU only.
    """
    o = cfg.optim
    devices = {p.device.type for p in params}
    fused_on = {"cpu", "cuda"} if o.dense != "adagrad" else {"cpu"}
    fused = bool(params) and len(devices) == 1 and devices <= fused_on and all(p.is_floating_point() for p in params)
    kwargs = {"lr": o.dense_lr, "weight_decay": o.weight_decay, "fused": True if fused else None}
    if o.dense == "adam":
        return torch.optim.Adam(params, **kwargs)
    if o.dense == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if o.dense == "adagrad":
        return torch.optim.Adagrad(params, **kwargs)
    return torch.optim.SGD(params, **kwargs)


class DenseStep:
    """Gradient clipping (``clip_norm``, 0: none) and the dense optimizer's step, as
    `torch.nn.utils.clip_grad_norm_` and ``optimizer.step()`` compute them, with less Python around the same operators.

    The dense part is small (SDIM: 16 tensors, 62K weights) and its step is Python-bound on the CPU: 0.19 ms of
    clipping and 0.24 of Adam's step a step, most of it the two functions' bookkeeping (grouping the tensors by device,
    building the optimizer's lists) around one ``_foreach_norm``, one ``_foreach_mul_`` and one ``_fused_adam_``.
    Where the optimizer is PyTorch's fused Adam or AdamW on the CPU with one parameter group and its state exists
    (from the first step on), those operators are called directly on the lists built once, with the same arguments:
    the same update bit for bit (`tests/test_dense_step.py`). Anything else runs the two functions themselves.
    """

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, clip_norm: float) -> None:
        self.params, self.optimizer, self.clip_norm = params, optimizer, float(clip_norm)
        groups = optimizer.param_groups
        g = groups[0] if len(groups) == 1 else {}
        self._direct = (
            isinstance(optimizer, torch.optim.Adam) and "decoupled_weight_decay" in g and g.get("fused") is True
            and not g.get("amsgrad") and not g.get("maximize") and not g.get("differentiable")
            and not g.get("capturable") and not isinstance(g.get("lr"), torch.Tensor)
            and len(g.get("params", [])) == len(params)
            and all(a is b for a, b in zip(g.get("params", []), params, strict=True))
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
        )  # fmt: skip

    def __call__(self) -> None:
        grads = [p.grad for p in self.params]
        state = self.optimizer.state
        if not self._direct or not grads or any(g is None for g in grads) or any(not state.get(p) for p in self.params):
            # (the first step builds the optimizer's state)
            if self.clip_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
            self.optimizer.step()
            return
        if self.clip_norm:  # `clip_grad_norm_` (`_get_total_norm`, `_clip_grads_with_norm_`) on CPU tensors
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
            torch._foreach_mul_(grads, torch.clamp(self.clip_norm / (total + 1e-6), max=1.0))
        st = [state[p] for p in self.params]
        g = self.optimizer.param_groups[0]
        beta1, beta2 = g["betas"]
        steps = [s["step"] for s in st]
        torch._foreach_add_(steps, 1)  # as `torch.optim.adam._fused_adam`
        fused = torch._fused_adamw_ if g["decoupled_weight_decay"] else torch._fused_adam_
        fused(
            self.params, grads, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [], steps, amsgrad=False,
            lr=float(g["lr"]), beta1=float(beta1), beta2=float(beta2), weight_decay=float(g["weight_decay"]),
            eps=float(g["eps"]), maximize=False, grad_scale=None, found_inf=None,
        )  # fmt: skip


def single_rank_constraints(model: torch.nn.Module, ctx: DistContext) -> dict[str, Any] | None:
    """On one rank every table is placed whole (table-wise). The planner's choice there was row-wise: one shard per
    table all the same, but row-wise's input bucketization and output permutation (an `index_select` of every
    looked-up row, whose backward is a serial scatter on the CPU) ran on every step for nothing. The step on
    prefetched batches, alternating without and with this: SIM-soft on the demo world (batch 512) 176 and 177 ms
    against 131 and 133; DIN on MovieLens (batch 1,024, L = 50) 78 and 79 ms against 68 and 66. With N ranks the
    planner chooses, as before."""
    if ctx.world_size > 1:
        return None
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingType
    from torchrec.modules.embedding_modules import EmbeddingCollection

    tables = [t.name for m in model.modules() if isinstance(m, EmbeddingCollection) for t in m.embedding_configs()]
    return {name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for name in tables}


class SingleRankWrapper:
    """TorchRec's data-parallel wrapper for a world of one rank: the dense part is placed on the device and not
    wrapped in `DistributedDataParallel`.

    With one rank there is nothing to all-reduce, but DDP still ran its forward bookkeeping and its reducer's hooks on
    every step: about 0.6 ms a step (TWIN at L = 50, two models built in one process and stepped alternately: 16.1
    against 15.5 ms at batch 32, 36.8 against 35.2 at 256; at 1,024 less than the noise). The gradients are the same
    (DDP divides by a world size of 1). `DistributedModelParallel.state_dict` drops DDP's ``module.`` prefix, so
    checkpoints are the same either way (a run resumes with the world size it started with).
    """

    def wrap(self, dmp: Any, env: Any, device: torch.device) -> None:  # noqa: ARG002 (TorchRec's interface)
        dmp._dmp_wrapped_module = dmp._dmp_wrapped_module.to(device)


COMPILE_AUTO_MIN_STEPS = 2_000  # train.compile=auto: compiling (3 to 15 s) pays off after about 1,000 steps


def compile_units(model: torch.nn.Module, mode: bool | str, planned_steps: int, device: torch.device) -> int:
    """`train.compile`: `DinAttention.compile_rows` on every DIN activation unit of `model`; returns how many.

    ``true`` compiles, ``false`` does not, ``auto`` compiles on the CPU when the run plans at least
    `COMPILE_AUTO_MIN_STEPS` steps per rank, except the Dice units where the native operators (`ctr.native`) run:
    DIN's step on MovieLens at batch 1,024 took 51 ms compiled against 61 eager (`docs/performance-log.md`, "A seventh
    round"), and compiling took 3 to 8 s here, so short runs (the demo's, the tests') stay eager; the native Dice is as
    fast as the compiled unit (41.0 to 48.5 ms against 42.5 to 50.4, the unit alone, three alternating rounds)
    without the compilation. On CUDA ``auto`` stays eager: not measured there.
    """
    from .. import native
    from ..modules.attention import DinAttention

    auto = mode == "auto" and device.type == "cpu" and planned_steps >= COMPILE_AUTO_MIN_STEPS

    def wanted(unit: DinAttention) -> bool:
        return mode is True or (auto and (unit.activation != "dice" or not native.available()))

    units = [m for m in model.modules() if isinstance(m, DinAttention) and wanted(m)]
    if not units:
        return 0
    for unit in units:
        unit.compile_rows()
    log.info("train.compile=%s: %d DIN activation unit(s) train through torch.compile (%d planned steps)",
             str(mode).lower(), len(units), planned_steps)  # fmt: skip
    return len(units)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_config(cfg: TrainConfig, model: CTRModel, *, train: bool, world_size: int = 1) -> LoaderConfig:
    return LoaderConfig(
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        views=model.views(),
        shuffle=train,
        seed=cfg.train.seed,
        num_workers=loader_workers(cfg.data.num_workers, world_size),
        shuffle_window=cfg.data.shuffle_window,
        max_behaviors=cfg.data.max_batch_behaviors if train else cfg.data.eval_max_batch_behaviors,
        sample_negatives=train,  # DIEN's auxiliary negatives: training only
    )


def first_batch(info: DatasetInfo, split: str, lcfg: LoaderConfig, features: list[str]) -> Batch:
    # with negatives: it also stands in for a training batch on a rank that ran dry (the model ignores them in eval)
    single = SplitLoader(
        info, split, LoaderConfig(**{**lcfg.__dict__, "num_workers": 0, "sample_negatives": True}), features
    )
    for b in single:
        return b
    raise ValueError(f"{info.data_dir}: split {split!r} has no samples")


@contextmanager
def frozen_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Restore the running statistics of batch-norm layers after the block: a padding step changes nothing."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


FAULT_ENV = "LIFELONG_CTR_FAULT"


def fault(where: str, count: int, ctx: DistContext) -> None:
    """Fault injection for the resume tests: `LIFELONG_CTR_FAULT=train:7` SIGKILLs rank 0 right after training
    step 7; `valid:2` during the 2nd validation (after its first batch). Unset in normal runs."""
    spec = os.environ.get(FAULT_ENV)
    if spec and ctx.is_main and spec == f"{where}:{count}":
        log.warning("%s=%s: killing this process (fault injection)", FAULT_ENV, spec)
        os.kill(os.getpid(), signal.SIGKILL)
