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
    RUN_DIR/model.pt           best weights, unsharded
    RUN_DIR/checkpoints/       last-rank<r>.pt per rank (for --resume with the same N)
    RUN_DIR/tensorboard/       when tensorboard is installed
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from features.loader import Batch, DatasetInfo, LoaderConfig, SampleStream, SplitLoader

from ..models import CTRModel, get_model_class
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
    model: torch.nn.Module, loader: SplitLoader, ctx: DistContext, dummy: Batch | None, max_batches: int | None = None
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


def _train_worker(ctx: DistContext, data_dir: str, run_dir: str, cfg_json: str, resume: bool) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    run = Path(run_dir)
    cfg = TrainConfig.model_validate(json.loads(cfg_json)["config"])
    params = model_params(cfg)
    info = DatasetInfo.load(data_dir)
    if ctx.is_main:  # build the sequence-store cache once, before the workers of every rank open it
        from features.sequence_store import SequenceStore

        SequenceStore.open(info.data_dir)
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
    train_loader = SplitLoader(info, "train", train_cfg, features, rank=ctx.rank, world_size=ctx.world_size)
    valid_loader = SplitLoader(info, "valid", eval_cfg, features, rank=ctx.rank, world_size=ctx.world_size)
    dummy = _first_batch(info, "valid" if info.split_rows.get("valid") else "train", eval_cfg, features)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_gauc": -math.inf, "best_step": -1, "bad_evals": 0}
    ckpt_dir = run / "checkpoints"
    if resume:
        path = ckpt_dir / f"last-rank{ctx.rank}.pt"
        if not path.exists():
            raise ConfigError(f"--resume: {path} not found (resume needs the same --nproc as the first run)")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["world_size"] != ctx.world_size:
            raise ConfigError(f"--resume: checkpoint was written by {saved['world_size']} ranks, now {ctx.world_size}")
        copy_local_state(dmp.state_dict(), saved["model"], "model")
        copy_local_state(dmp.fused_optimizer.state_dict()["state"], saved["sparse_opt"], "sparse_opt")
        dense_opt.load_state_dict(saved["dense_opt"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
        log.info("resumed at step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batch_in_epoch"])

    tlog = JsonlLog(run / "train_log.jsonl", ctx.is_main)

    def save_checkpoint() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "world_size": ctx.world_size,
            "model": local_state(dmp.state_dict()),
            "sparse_opt": local_state(dmp.fused_optimizer.state_dict()["state"]),
            "dense_opt": dense_opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": dict(state),
            "rng": torch.get_rng_state(),
        }
        tmp = ckpt_dir / f".last-rank{ctx.rank}.pt.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, ckpt_dir / f"last-rank{ctx.rank}.pt")

    def validate() -> bool:
        """Score the valid split; export on improvement; returns True when training should stop."""
        t0 = time.time()
        arrays = predict_distributed(dmp, valid_loader, ctx, dummy, cfg.train.eval_max_batches)
        metrics = validation_metrics(arrays) if arrays is not None else None
        metrics = ctx.broadcast_object(metrics)
        score = next((m for m in (metrics["gauc"], metrics["auc"]) if math.isfinite(m)), -math.inf)
        improved = score > state["best_gauc"] or state["best_step"] < 0
        if improved:
            state["best_gauc"], state["best_step"], state["bad_evals"] = score, state["step"], 0
            weights = full_state_dict(dmp, ctx)
            if ctx.is_main:
                tmp = run / ".model.pt.tmp"
                torch.save(weights, tmp)
                os.replace(tmp, run / "model.pt")
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
    stop = False
    dmp.train()
    while state["epoch"] < cfg.train.epochs and not stop:
        epoch = state["epoch"]
        train_loader.set_epoch(epoch)
        steps_hint = train_loader.num_rows() // cfg.data.batch_size
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
        epoch_done = False
        while not (max_steps is not None and state["step"] >= max_steps):
            batch = next(it, None)
            if ctx.all_reduce_int(0 if batch is None else 1, "min") == 0:
                epoch_done = True  # the first rank to run dry ends the epoch for all (same steps everywhere)
                break
            assert batch is not None
            batch = batch.to(ctx.device)
            out = dmp(batch)
            loss = F.binary_cross_entropy_with_logits(out.logit.float(), batch.dense["label"])
            total = loss + out.aux_loss if out.aux_loss is not None else loss
            dense_opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.optim.clip_norm:
                torch.nn.utils.clip_grad_norm_(dense_params, cfg.optim.clip_norm)
            dense_opt.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            window_loss += float(loss.detach()) * batch.size
            window_samples += batch.size
            bar.update(1)
            if state["step"] % cfg.train.log_every == 0:
                dt = max(time.time() - t_window, 1e-9)
                rec = {
                    "kind": "train",
                    "step": state["step"],
                    "epoch": epoch,
                    "loss": window_loss / max(window_samples, 1),
                    "aux_loss": float(out.aux_loss.detach()) if out.aux_loss is not None else None,
                    "samples_per_s": window_samples * ctx.world_size / dt,
                    "lr": dense_opt.param_groups[0]["lr"],
                }
                tlog.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.0f}")
                window_loss, window_samples, t_window = 0.0, 0, time.time()
            if cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0:
                save_checkpoint()
            if cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0:
                stop = validate()
            if stop:
                break
        if max_steps is not None and state["step"] >= max_steps:
            stop = True
        bar.close()
        if not cfg.train.eval_every or state["step"] % cfg.train.eval_every != 0:
            stop = validate() or stop
        if epoch_done:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            scheduler.step()
        save_checkpoint()
        if stop:
            break
    tlog.close()
    if ctx.is_main:
        summary = {
            "steps": state["step"],
            "epochs_done": state["epoch"],
            "best_valid_gauc": state["best_gauc"],
            "best_step": state["best_step"],
            "world_size": ctx.world_size,
        }
        (run / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("training done: %s", summary)


def train(
    data_dir: Path,
    run_dir: Path,
    cfg: TrainConfig,
    *,
    nproc: int = 1,
    resume: bool = False,
) -> Path:
    """Train `cfg.model.name` on `data_dir` into `run_dir` with `nproc` ranks; returns run_dir."""
    info = DatasetInfo.load(data_dir)  # fail early on a bad dataset directory
    if not info.split_rows.get("train"):
        raise ConfigError(f"{data_dir}: the train split is empty; check split boundaries in its manifest")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for stale in ("train_log.jsonl", "model.pt", "train_summary.json"):
            (run_dir / stale).unlink(missing_ok=True)
    resolved = {
        "config": cfg.model_dump(),
        "model": cfg.model,
        "run_name": cfg.run_name or cfg.model["name"],
        "data_dir": str(Path(data_dir).resolve()),
        "nproc": nproc,
    }
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    launch(_train_worker, nproc, run_dir, str(data_dir), str(run_dir), json.dumps(resolved), resume)
    return run_dir


def load_trained(run_dir: Path, data_dir: Path | None = None) -> tuple[CTRModel, TrainConfig, DatasetInfo]:
    """The unsharded model of a run with its best weights (`model.pt`), ready for `eval()`."""
    resolved = json.loads((run_dir / "config.json").read_text())
    cfg = TrainConfig.model_validate(resolved["config"])
    params = model_params(cfg)
    info = DatasetInfo.load(data_dir or resolved["data_dir"])
    model = build_model(cfg, params, info, device=torch.device("cpu"))
    weights_path = run_dir / "model.pt"
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path}: no trained weights; run `ctr train` into {run_dir} first")
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    return model, cfg, info


__all__ = ["SampleStream", "load_trained", "predict_distributed", "train"]
