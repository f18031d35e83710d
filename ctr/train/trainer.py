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

The run directory's layout and readers are in `ctr/runs.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from features.dataset import DatasetInfo
from features.loader import Batch, LoaderConfig, SplitLoader
from features.outputs import DirLock
from features.sequence_store import SequenceStore

from .. import runs
from ..config import ConfigError, TrainConfig
from ..models import CTRModel, ModelParams
from ..runs import JsonlLog, build_model, claim_run, clear_run_outputs, model_params, write_json_atomic, write_seen
from . import checkpoint
from .distributed import DistContext, copy_local_state, full_state_dict, launch, local_state
from .validation import predict_distributed, validation_metrics

log = logging.getLogger(__name__)
# Advice aimed at TorchRec's own developers ("construct Topology via TopologyFactory", "dry run estimate"): noise here.
for _noisy in ("torchrec.distributed.planner", "torch.fx._symbolic_trace", "torchrec.distributed.model_parallel"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

SPARSE_OPTIMIZERS = {"adagrad": "Adagrad", "sgd": "SGD", "adam": "Adam", "rowwise_adagrad": "RowWiseAdagrad"}


def _sparse_optimizer_class(name: str) -> type:
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad
    return getattr(torch.optim, SPARSE_OPTIMIZERS[name])


def _dense_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.dense == "adam":
        return torch.optim.Adam(params, lr=o.dense_lr, weight_decay=o.weight_decay)
    if o.dense == "adamw":
        return torch.optim.AdamW(params, lr=o.dense_lr, weight_decay=o.weight_decay)
    if o.dense == "adagrad":
        return torch.optim.Adagrad(params, lr=o.dense_lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.dense_lr, weight_decay=o.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_config(cfg: TrainConfig, model: CTRModel, *, train: bool) -> LoaderConfig:
    return LoaderConfig(
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        views=model.views(),
        shuffle=train,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        shuffle_window=cfg.data.shuffle_window,
        max_behaviors=cfg.data.max_batch_behaviors if train else cfg.data.eval_max_batch_behaviors,
    )


def _first_batch(info: DatasetInfo, split: str, lcfg: LoaderConfig, features: list[str]) -> Batch:
    single = SplitLoader(info, split, LoaderConfig(**{**lcfg.__dict__, "num_workers": 0}), features)
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


def _fault(where: str, count: int, ctx: DistContext) -> None:
    """Fault injection for the resume tests: `LIFELONG_CTR_FAULT=train:7` SIGKILLs rank 0 right after training
    step 7; `valid:2` during the 2nd validation (after its first batch). Unset in normal runs."""
    spec = os.environ.get(FAULT_ENV)
    if spec and ctx.is_main and spec == f"{where}:{count}":
        log.warning("%s=%s: killing this process (fault injection)", FAULT_ENV, spec)
        os.kill(os.getpid(), signal.SIGKILL)


def _train_worker(
    ctx: DistContext,
    data_dir: str,
    run_dir: str,
    resolved: dict,
    cfg: TrainConfig,
    params: ModelParams,
    resume: bool,
) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    run = Path(run_dir)
    info = DatasetInfo.load(data_dir)
    SequenceStore.open(info.data_dir)  # built once under a lock, before the loader workers of every rank open it
    ctx.barrier()

    if ctx.device.type == "cpu" and ctx.world_size > 1:  # N ranks on one host: split the cores, do not oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model["name"], params, info, device=torch.device("meta"))
    apply_optimizer_in_backward(
        _sparse_optimizer_class(cfg.optim.sparse), model.embedding.parameters(), {"lr": cfg.optim.sparse_lr}
    )
    import torch.distributed as dist

    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ctx.world_size, compute_device=ctx.device.type, local_world_size=ctx.world_size)
    )
    plan = planner.collective_plan(model, None, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=ctx.device, plan=plan)
    dense_params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters(), include=False)]
    dense_opt = _dense_optimizer(cfg, dense_params)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(dense_opt, gamma=cfg.optim.lr_decay_per_epoch)

    features = model.features()
    train_cfg = loader_config(cfg, model, train=True)
    eval_cfg = loader_config(cfg, model, train=False)
    has_valid = bool(info.split_rows.get("valid"))
    widest = cfg.data.batch_size * sum(v.length for v in train_cfg.views)
    if ctx.is_main and train_cfg.max_behaviors and widest > train_cfg.max_behaviors:
        log.warning(
            "data.max_batch_behaviors=%d: a batch of %d samples can hold up to %d padded behaviors here, so batches of "
            "long histories are cut into smaller ones, each a training step (train.max_steps counts them); raise "
            "the cap to keep batches whole if memory allows",
            train_cfg.max_behaviors,
            cfg.data.batch_size,
            widest,
        )
    train_loader = SplitLoader(info, "train", train_cfg, features, rank=ctx.rank, world_size=ctx.world_size)
    valid_loader = SplitLoader(info, "valid", eval_cfg, features, rank=ctx.rank, world_size=ctx.world_size)
    dummy = _first_batch(info, "valid" if has_valid else "train", eval_cfg, features)
    if not has_valid and ctx.is_main:
        log.warning(
            "%s has no validation split: training for the configured %d epoch(s)%s and keeping the last model "
            "(no early stopping)",
            info.data_dir,
            cfg.train.epochs,
            f" or {cfg.train.max_steps} steps" if cfg.train.max_steps else "",
        )

    # best_score: the best validation GAUC (AUC when no validation user has both classes; best_metric says which)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": -math.inf, "best_step": -1, "bad_evals": 0}
    state |= {"validations": 0, "best_metric": None}
    ckpt_dir = run / runs.CHECKPOINTS
    identity = {
        "world_size": ctx.world_size,
        "dataset_fingerprint": info.fingerprint,
        "data_dir": str(Path(data_dir).resolve()),
        "config": resolved["config"],
    }
    if resume:
        found = checkpoint.latest_complete(ckpt_dir)
        if found is None:
            raise ConfigError(
                f"--resume: no complete checkpoint in {ckpt_dir}. How to fix: train without --resume (--overwrite "
                "to start the run again), or set train.checkpoint_every"
            )
        gen, meta = found
        checkpoint.check_resumable(gen, meta, identity)
        saved = checkpoint.load_rank(gen, ctx.rank)
        copy_local_state(dmp.state_dict(), saved["model"], "model")
        copy_local_state(dmp.fused_optimizer.state_dict()["state"], saved["sparse_opt"], "sparse_opt")
        dense_opt.load_state_dict(saved["dense_opt"])
        scheduler.load_state_dict(saved["scheduler"])
        state = dict(saved["state"])
        if "best_gauc" in state:  # a checkpoint written before the score was named for what it holds
            state["best_score"] = state.pop("best_gauc")
            state.setdefault("best_metric", "gauc")
        checkpoint.set_rng_state(saved["rng"])
        if ctx.is_main:
            log.info(
                "resumed from %s: step %d (epoch %d, batch %d)",
                gen,
                state["step"],
                state["epoch"],
                state["batch_in_epoch"],
            )

    tlog = JsonlLog(run / runs.TRAIN_LOG, ctx.is_main)
    if resume:
        tlog.truncate_after(state["step"])  # records a killed run wrote after its last checkpoint come again

    def save_generation() -> None:
        gen = checkpoint.generation_dir(ckpt_dir, state["step"])
        payload = {
            "model": local_state(dmp.state_dict()),
            "sparse_opt": local_state(dmp.fused_optimizer.state_dict()["state"]),
            "dense_opt": dense_opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": dict(state),
            "rng": checkpoint.rng_state(),
        }
        checkpoint.save_rank(gen, ctx.rank, payload)
        ctx.barrier()  # every rank's file is in place before the generation is published
        if ctx.is_main:
            meta = identity | {"step": state["step"], "epoch": state["epoch"], "batch_size": cfg.data.batch_size}
            checkpoint.publish(gen, meta, cfg.train.keep_checkpoints)
        ctx.barrier()

    def export(weights: dict[str, torch.Tensor] | None) -> None:
        if ctx.is_main:
            assert weights is not None
            tmp = run / f".{runs.MODEL}.tmp"
            torch.save(weights, tmp)
            os.replace(tmp, run / runs.MODEL)

    def validate() -> bool:
        """Score the valid split; export on improvement; returns True when training should stop."""
        if not has_valid:
            return False
        t0 = time.time()
        state["validations"] += 1
        n_val = state["validations"]
        arrays = predict_distributed(
            dmp, valid_loader, ctx, dummy, cfg.train.eval_max_batches, on_batch=lambda i: _fault("valid", n_val, ctx)
        )
        metrics = validation_metrics(arrays) if arrays is not None else None
        metrics = ctx.broadcast_object(metrics)
        metric = next((m for m in ("gauc", "auc") if math.isfinite(metrics[m])), None)
        score = metrics[metric] if metric is not None else -math.inf
        improved = score > state["best_score"] or state["best_step"] < 0
        if improved:
            state["best_score"], state["best_step"], state["bad_evals"] = score, state["step"], 0
            state["best_metric"] = metric
            export(full_state_dict(dmp, ctx))
        else:
            state["bad_evals"] += 1
        tlog.write(
            {
                "kind": "eval",
                "split": "valid",
                "step": state["step"],
                "epoch": state["epoch"],
                **metrics,
                "best": improved,
                "seconds": round(time.time() - t0, 2),
            }
        )
        if ctx.is_main:
            log.info(
                "valid @ step %d: AUC %.4f GAUC %.4f logloss %.4f%s",
                state["step"],
                metrics["auc"],
                metrics["gauc"],
                metrics["logloss"],
                " (best)" if improved else "",
            )
        return state["bad_evals"] >= cfg.train.patience

    from tqdm import tqdm

    max_steps = cfg.train.max_steps
    stop = max_steps is not None and state["step"] >= max_steps
    seen: dict[str, list[np.ndarray]] = {"user_idx": [], "item_idx": [], "ts": []}
    dmp.train()
    while state["epoch"] < cfg.train.epochs and not stop:
        epoch = state["epoch"]
        train_loader.set_epoch(epoch)
        steps_hint = -(-train_loader.num_rows() // cfg.data.batch_size)
        bar = tqdm(
            total=steps_hint,
            initial=state["batch_in_epoch"],
            desc=f"epoch {epoch}",
            unit="step",
            disable=not ctx.is_main,
            mininterval=2.0,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        it = iter(train_loader)
        for _ in range(state["batch_in_epoch"]):  # resume mid-epoch: skip what was already trained on
            next(it, None)
        window_terms: dict[str, float] = {}
        window_samples, t_window = 0, time.time()
        epoch_done = validated = False
        while not (max_steps is not None and state["step"] >= max_steps):
            batch = next(it, None)
            n_local = 0 if batch is None else batch.size
            # The epoch ends when every rank has run dry; a rank that ran dry first steps on a zero-weight copy of
            # a batch so the collectives stay matched, and each rank's loss is weighted by its share of the step's
            # samples (the gradient is the mean over every sample of the step, whoever held it).
            n_global = ctx.all_reduce_int(n_local, "sum")
            if n_global == 0:
                epoch_done = True
                break
            if cfg.train.record_samples and batch is not None:
                for k in seen:
                    seen[k].append(batch.dense[k].numpy())
            weight = n_local * ctx.world_size / n_global
            step_batch = (batch if batch is not None else dummy).to(ctx.device)
            with frozen_buffers(dmp) if batch is None else nullcontext():
                out = dmp(step_batch)
                terms = model.loss(out, step_batch)
                total = sum(terms.values())
                if weight != 1.0:
                    total = total * weight
                dense_opt.zero_grad(set_to_none=True)
                total.backward()
            if cfg.optim.clip_norm:
                torch.nn.utils.clip_grad_norm_(dense_params, cfg.optim.clip_norm)
            dense_opt.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            for name, term in terms.items():
                window_terms[name] = window_terms.get(name, 0.0) + float(term.detach()) * n_local
            window_samples += n_local
            bar.update(1)
            _fault("train", state["step"], ctx)
            if state["step"] % cfg.train.log_every == 0:
                dt = max(time.time() - t_window, 1e-9)
                samples = ctx.all_reduce_int(window_samples, "sum")
                # "loss" is the CTR term (BCE) of every model; each other term's window mean is logged as loss_<name>
                means = {n: ctx.all_reduce_float(v) / max(samples, 1) for n, v in sorted(window_terms.items())}
                rec = {
                    "kind": "train",
                    "step": state["step"],
                    "epoch": epoch,
                    "loss": means.get("ctr", math.nan),
                    **{f"loss_{n}": v for n, v in means.items() if n != "ctr"},
                    "samples_per_s": samples / dt,
                    "lr": dense_opt.param_groups[0]["lr"],
                }
                tlog.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.0f}")
                window_terms, window_samples, t_window = {}, 0, time.time()
            validated = bool(cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0)
            if validated:
                stop = validate()
            if validated or (cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0):
                save_generation()  # after the validation of this step: its early-stopping state is in the generation
            if stop:
                break
        if max_steps is not None and state["step"] >= max_steps:
            stop = True
        bar.close()
        if not validated:
            stop = validate() or stop
        if epoch_done:
            if cfg.train.record_samples:
                write_seen(run, epoch, ctx.rank, seen)
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            scheduler.step()
        save_generation()
    if not has_valid:
        export(full_state_dict(dmp, ctx))  # no validation split: the last model is the model
    tlog.close()
    if ctx.is_main:
        summary = {
            "steps": state["step"],
            "epochs_done": state["epoch"],
            # the best validation score and what it is: GAUC, or AUC when no validation user had both classes
            "best_valid_metric": state.get("best_metric") if has_valid else None,
            "best_valid_score": state["best_score"] if has_valid else None,
            "best_step": state["best_step"] if has_valid else state["step"],
            "model": "best validation GAUC" if has_valid else "last (the dataset has no validation split)",
            "world_size": ctx.world_size,
            "dataset_fingerprint": info.fingerprint,
        }
        (run / runs.SUMMARY).write_text(json.dumps(summary, indent=2))
        log.info("training done: %s", summary)


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
        launch(_train_worker, nproc, run_dir, str(data_dir), str(run_dir), resolved, cfg, params, resume)
    return run_dir


__all__ = ["train"]
