"""`ctr train`: one model on one dataset directory, on 1 or N ranks, into a run directory.

Per rank: build the model (embedding tables on the meta device), attach the fused sparse optimizer to the
EmbeddingCollection (`apply_optimizer_in_backward`), let the TorchRec planner shard it, wrap everything in
DistributedModelParallel (tables sharded, dense part data-parallel), then loop: batch -> logits -> the model's
loss terms (`CTRModel.loss`: BCE, + an auxiliary term for DIEN and SIM-soft), summed -> backward (the sparse update
happens inside) -> clip and step the dense optimizer.

Validation (every `train.eval_every` steps, or at each epoch's end) scores the whole valid split across ranks and
computes AUC and GAUC on rank 0; training stops early after `train.patience` validations without a better GAUC
(AUC when no validation user has both classes), and the best weights are exported unsharded as `model.pt` (what
`ctr evaluate` loads, whatever N trained it).

The run directory's layout and readers are in `ctr/runs.py`; what one rank does is in `worker.py`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from features.dataset import DatasetInfo
from features.outputs import DirLock

from .. import runs
from ..config import ConfigError, TrainConfig
from ..models import ModelParams
from ..runs import claim_run, clear_run_outputs, model_params, write_json_atomic
from .distributed import launch
from .setup import FAULT_ENV, check_sparse_optimizer
from .worker import run_rank

log = logging.getLogger(__name__)


def train(
    data_dir: Path,
    run_dir: Path,
    cfg: TrainConfig,
    params: ModelParams | None = None,
    *,
    nproc: int = 1,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Train `cfg.model.name` on `data_dir` into `run_dir` with `nproc` ranks; returns run_dir.

    `params` are the model's validated Params (`ctr.config.resolve_train_config` returns both); None validates
    them from ``cfg.model``.

    A new run needs a new or empty `run_dir`; an earlier run there is replaced only with `overwrite` (its outputs
    are cleared first, so no prediction or metric of the old model stays beside the new one) and continued only
    with `resume`. The run directory is locked while training.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc {nproc!r}: expected a positive integer number of training processes")
    if nproc > (os.cpu_count() or 1):
        log.warning("--nproc %d is more than the %d CPU cores here: it works (gloo), but slower", nproc, os.cpu_count())
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run, or start it again)")
    check_sparse_optimizer(cfg.optim.sparse, cpu_kernel=cfg.optim.sparse_cpu_kernel)
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    info = DatasetInfo.load(data_dir)  # fail early on a bad dataset directory
    if not info.split_rows.get("train"):
        raise ConfigError(f"{data_dir}: the train split is empty; check split boundaries in its manifest")
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None  # under torchrun: one call per rank
    leader = rank in (None, "0")
    claim_run(run_dir, data_dir, info, resume=resume, overwrite=overwrite, leader=leader)
    run_dir.mkdir(parents=True, exist_ok=True)
    with DirLock(run_dir / (".lock" if rank is None else f".lock-rank{rank}"), "run directory"):
        resolved = {
            "config": cfg.model_dump(),
            "model": cfg.model,
            "run_name": cfg.run_name or cfg.model["name"],
            "data_dir": str(data_dir.resolve()),
            "dataset_fingerprint": info.fingerprint,
            "nproc": int(os.environ.get("WORLD_SIZE", nproc)),
        }
        if leader:
            if not resume:
                clear_run_outputs(run_dir)
            write_json_atomic(run_dir / runs.CONFIG, resolved)
        if params is None:
            params = model_params(cfg.model)
        launch(run_rank, nproc, run_dir, str(data_dir), str(run_dir), resolved, cfg, params, resume)
    return run_dir


__all__ = ["FAULT_ENV", "train"]
