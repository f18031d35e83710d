"""`ctr train`: one model on one dataset directory, on 1 or N ranks, into a run directory.

Per rank: build the model (embedding tables on the meta device), attach the fused sparse optimizer to the
EmbeddingCollection (`apply_optimizer_in_backward`), let the TorchRec planner shard it, wrap everything in
DistributedModelParallel (tables sharded, dense part data-parallel), then loop: batch -> logits -> BCE (+ the
model's auxiliary loss) -> backward (the sparse update happens inside) -> clip and step the dense optimizer.

Validation (every `train.eval_every` steps, or at each epoch's end) scores the whole valid split across ranks and
computes AUC and GAUC on rank 0; training stops early after `train.patience` validations without a better GAUC,
and the best weights are exported unsharded as `model.pt` (what `ctr evaluate` loads, whatever N trained it).

Run directory::

    RUN_DIR/config.json        resolved config (+ dataset, world size, model name)
    RUN_DIR/train_log.jsonl    {"kind": "train", step, epoch, loss, samples_per_s, ...} and {"kind": "eval", ...}
    RUN_DIR/model.pt           best weights, unsharded (the last weights when the dataset has no validation split)
    RUN_DIR/train_summary.json steps, epochs, best step and GAUC, which model was kept, the dataset fingerprint
    RUN_DIR/checkpoints/       gen-<step>/rank<r>.pt + COMPLETE.json: one generation per checkpoint (checkpoint.py)
    RUN_DIR/samples_seen/      epoch<e>-rank<r>.parquet, what each rank trained on (train.record_samples)
    RUN_DIR/tensorboard/       when tensorboard is installed
    RUN_DIR/.lock              held while training (a second training into the directory fails at once)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from features.errors import DatasetError
from features.loader import Batch, DatasetInfo, LoaderConfig, SampleStream, SplitLoader
from features.outputs import DirLock, check_no_overlap, claim_output_dir
from features.sequence_store import SequenceStore

from ..models import CTRModel, get_model_class
from . import checkpoint
from .config import ConfigError, TrainConfig
from .distributed import DistContext, copy_local_state, full_state_dict, launch, local_state

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


def model_params(cfg: TrainConfig) -> Any:
    """The model's validated Params from the `model:` section of a resolved config."""
    cls = get_model_class(cfg.model["name"])
    return cls.Params.model_validate({k: v for k, v in cfg.model.items() if k != "name"})


def build_model(cfg: TrainConfig, params: Any, info: DatasetInfo, device: torch.device | None = None) -> CTRModel:
    cls = get_model_class(cfg.model["name"])
    return cls(params, info, device=device)


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


class JsonlLog:
    """Append-only per-step log (rank 0); also mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.f = path.open("a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run writes them again from its checkpoint on)."""
        if not self.enabled:
            return
        assert self.f is not None
        self.f.close()
        path = Path(self.f.name)
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(kept))
        self.f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.f is not None
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _batches_with_padding(loader: SplitLoader, ctx: DistContext, dummy: Batch | None) -> Iterator[tuple[Batch, bool]]:
    """Yield (batch, real) until every rank is done; a rank that ran dry yields a dummy (real=False) so the
    collectives inside the sharded forward stay matched across ranks. Evaluation only: nothing is dropped."""
    it = iter(loader)
    last = dummy
    while True:
        batch = next(it, None)
        if ctx.all_reduce_int(0 if batch is None else 1, "max") == 0:
            return
        if batch is None:
            if last is None:
                raise RuntimeError("rank has no batch to pad with")
            yield last, False
        else:
            last = batch
            yield batch, True


@torch.no_grad()
def predict_distributed(
    model: torch.nn.Module,
    loader: SplitLoader,
    ctx: DistContext,
    dummy: Batch | None,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray] | None:
    """Score a split across ranks; rank 0 gets the concatenated arrays (others None)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user_idx", "item_idx", "ts", "label", "hist_len", "score")}
    has_p = loader.info.has_p_true
    if has_p:
        parts["p_true"] = []
    for i, (batch, real) in enumerate(_batches_with_padding(loader, ctx, dummy)):
        if max_batches is not None and i >= max_batches:
            break  # every rank is at the same iteration here, so the cap keeps the collectives matched
        out = model(batch.to(ctx.device))
        if on_batch is not None:
            on_batch(i)
        if not real:
            continue
        parts["score"].append(torch.sigmoid(out.logit.float()).cpu().numpy())
        for k in ("user_idx", "item_idx", "ts", "hist_len"):
            parts[k].append(batch.dense[k].numpy())
        parts["label"].append(batch.dense["label"].numpy().astype(np.int8))
        if has_p:
            parts["p_true"].append(batch.dense["p_true"].numpy())
    local = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    gathered = ctx.gather_objects(local)
    model.train()
    if gathered is None:
        return None
    return {k: np.concatenate([g[k] for g in gathered]) for k in local}


def validation_metrics(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    from ..evaluation.metrics import auc, gauc, logloss

    g = gauc(arrays["label"], arrays["score"], arrays["user_idx"])
    return {
        "auc": float(auc(arrays["label"], arrays["score"])),
        "gauc": float(g.value),
        "logloss": float(logloss(arrays["label"], arrays["score"])),
        "samples": int(len(arrays["label"])),
    }


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


def _train_worker(ctx: DistContext, data_dir: str, run_dir: str, cfg_json: str, resume: bool) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    run = Path(run_dir)
    resolved = json.loads(cfg_json)
    cfg = TrainConfig.model_validate(resolved["config"])
    params = model_params(cfg)
    info = DatasetInfo.load(data_dir)
    SequenceStore.open(info.data_dir)  # built once under a lock, before the loader workers of every rank open it
    ctx.barrier()

    if ctx.device.type == "cpu" and ctx.world_size > 1:  # N ranks on one host: split the cores, do not oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    seed_everything(cfg.train.seed)
    model = build_model(cfg, params, info, device=torch.device("meta"))
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

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_gauc": -math.inf, "best_step": -1, "bad_evals": 0}
    state |= {"validations": 0}
    ckpt_dir = run / "checkpoints"
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
        checkpoint.set_rng_state(saved["rng"])
        if ctx.is_main:
            log.info(
                "resumed from %s: step %d (epoch %d, batch %d)",
                gen,
                state["step"],
                state["epoch"],
                state["batch_in_epoch"],
            )

    tlog = JsonlLog(run / "train_log.jsonl", ctx.is_main)
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
            tmp = run / ".model.pt.tmp"
            torch.save(weights, tmp)
            os.replace(tmp, run / "model.pt")

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
        score = next((m for m in (metrics["gauc"], metrics["auc"]) if math.isfinite(m)), -math.inf)
        improved = score > state["best_gauc"] or state["best_step"] < 0
        if improved:
            state["best_gauc"], state["best_step"], state["bad_evals"] = score, state["step"], 0
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
        window_loss, window_samples, t_window = 0.0, 0, time.time()
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
                loss = F.binary_cross_entropy_with_logits(out.logit.float(), step_batch.dense["label"])
                total = loss + out.aux_loss if out.aux_loss is not None else loss
                if weight != 1.0:
                    total = total * weight
                dense_opt.zero_grad(set_to_none=True)
                total.backward()
            if cfg.optim.clip_norm:
                torch.nn.utils.clip_grad_norm_(dense_params, cfg.optim.clip_norm)
            dense_opt.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            window_loss += float(loss.detach()) * n_local
            window_samples += n_local
            bar.update(1)
            _fault("train", state["step"], ctx)
            if state["step"] % cfg.train.log_every == 0:
                dt = max(time.time() - t_window, 1e-9)
                loss_sum = ctx.all_reduce_float(window_loss)
                samples = ctx.all_reduce_int(window_samples, "sum")
                rec = {
                    "kind": "train",
                    "step": state["step"],
                    "epoch": epoch,
                    "loss": loss_sum / max(samples, 1),
                    "aux_loss": float(out.aux_loss.detach()) if out.aux_loss is not None else None,
                    "samples_per_s": samples / dt,
                    "lr": dense_opt.param_groups[0]["lr"],
                }
                tlog.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.0f}")
                window_loss, window_samples, t_window = 0.0, 0, time.time()
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
                _write_seen(run, epoch, ctx.rank, seen)
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
            "best_valid_gauc": state["best_gauc"] if has_valid else None,
            "best_step": state["best_step"] if has_valid else state["step"],
            "model": "best validation GAUC" if has_valid else "last (the dataset has no validation split)",
            "world_size": ctx.world_size,
            "dataset_fingerprint": info.fingerprint,
        }
        (run / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("training done: %s", summary)


def _write_seen(run: Path, epoch: int, rank: int, seen: dict[str, list[np.ndarray]]) -> None:
    """What this rank trained on in one epoch (train.record_samples): the exactly-once audit of a run."""
    folder = run / "samples_seen"
    folder.mkdir(exist_ok=True)
    table = pa.table({k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in seen.items()})
    pq.write_table(table, folder / f"epoch{epoch}-rank{rank}.parquet")
    for v in seen.values():
        v.clear()


RUN_OUTPUTS = (
    "config.json",
    "train_log.jsonl",
    "model.pt",
    ".model.pt.tmp",
    "train_summary.json",
    "checkpoints",
    "tensorboard",
    "samples_seen",
    ".dist_store",
    ".dist_errors",
)


def clear_run_outputs(run_dir: Path) -> None:
    """Remove what `ctr train` and `ctr evaluate` wrote into a run directory (and nothing else)."""
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for pattern in ("predictions*.parquet", "metrics*.json"):
        for p in run_dir.glob(pattern):
            p.unlink()


def train(
    data_dir: Path,
    run_dir: Path,
    cfg: TrainConfig,
    *,
    nproc: int = 1,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Train `cfg.model.name` on `data_dir` into `run_dir` with `nproc` ranks; returns run_dir.

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
    check_no_overlap(run_dir, {"dataset directory": data_dir, "raw directory": info.manifest.get("raw_dir")})
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None  # under torchrun: one call per rank
    leader = rank in (None, "0")
    if resume:
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.json); train without --resume first")
    elif leader and claim_output_dir(run_dir, "config.json", overwrite=overwrite, what="run directory"):
        pass  # cleared below, under the lock
    run_dir.mkdir(parents=True, exist_ok=True)
    with DirLock(run_dir / (".lock" if rank is None else f".lock-rank{rank}"), "run directory"):
        if leader and not resume:
            clear_run_outputs(run_dir)
        resolved = {
            "config": cfg.model_dump(),
            "model": cfg.model,
            "run_name": cfg.run_name or cfg.model["name"],
            "data_dir": str(data_dir.resolve()),
            "dataset_fingerprint": info.fingerprint,
            "nproc": nproc,
        }
        if leader:
            if resume:
                before = json.loads((run_dir / "config.json").read_text())
                resolved["nproc"] = int(os.environ.get("WORLD_SIZE", nproc))
                if before.get("dataset_fingerprint") not in (None, info.fingerprint):
                    log.warning("--resume: %s changed since this run started; the checkpoint check decides", data_dir)
            tmp = run_dir / ".config.json.tmp"
            tmp.write_text(json.dumps(resolved, indent=2))
            os.replace(tmp, run_dir / "config.json")
        launch(_train_worker, nproc, run_dir, str(data_dir), str(run_dir), json.dumps(resolved), resume)
    return run_dir


def load_trained(run_dir: Path, data_dir: Path | None = None) -> tuple[CTRModel, TrainConfig, DatasetInfo]:
    """The unsharded model of a run with its best weights (`model.pt`), ready for `eval()`.

    The dataset must be the one the run was trained on (its manifest fingerprint, recorded in config.json): a
    dataset rebuilt under a trained run has other vocabularies, and scoring it with the old model is silently wrong.
    """
    config_path = Path(run_dir) / "config.json"
    if not config_path.exists():
        raise DatasetError(f"{config_path}: not found; RUN_DIR must be a run directory written by `ctr train`")
    resolved = json.loads(config_path.read_text())
    cfg = TrainConfig.model_validate(resolved["config"])
    params = model_params(cfg)
    info = DatasetInfo.load(data_dir or resolved["data_dir"])
    trained_on = resolved.get("dataset_fingerprint")
    if trained_on is None:
        log.warning("%s: written before runs recorded their dataset; cannot check it is %s", config_path, info.data_dir)
    elif trained_on != info.fingerprint:
        raise DatasetError(
            f"{info.data_dir}: not the dataset {run_dir} was trained on (manifest fingerprint {info.fingerprint[:12]}, "
            f"the run recorded {trained_on[:12]}; built {info.manifest.get('created_at')}). The dataset was rebuilt "
            "or changed (ctr sid?) after training. How to fix: train again on it (ctr train --overwrite), or "
            "evaluate against the dataset the run was trained on"
        )
    model = build_model(cfg, params, info, device=torch.device("cpu"))
    weights_path = run_dir / "model.pt"
    if not weights_path.exists():
        raise DatasetError(f"{weights_path}: no trained weights; run `ctr train` into {run_dir} first")
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    return model, cfg, info


__all__ = ["SampleStream", "load_trained", "predict_distributed", "train"]
