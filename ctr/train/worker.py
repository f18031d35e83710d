"""One training rank: build and shard the model, resume, then the loop of steps, validations and checkpoints.

`run_rank` is what `ctr.train.distributed.launch` runs on every rank; `Training` holds the rank's state so that each
part (a step, a validation, a checkpoint generation, the export) is one short method.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.dataset import DatasetInfo
from features.loader import Batch, SplitLoader
from features.sequence_store import SequenceStore

from .. import runs
from ..config import ConfigError, TrainConfig
from ..malloc import keep_freed_memory
from ..models import ModelParams
from ..runs import JsonlLog, build_model, write_seen
from . import checkpoint, cpu_tables, local_lookup
from .distributed import DistContext, copy_local_state, full_state_dict, local_state
from .setup import (
    DenseStep,
    SingleRankWrapper,
    compile_units,
    dense_optimizer,
    fault,
    first_batch,
    frozen_buffers,
    loader_config,
    seed_everything,
    single_rank_constraints,
    sparse_optimizer_class,
)
from .validation import predict_distributed, validation_metrics

log = logging.getLogger(__name__)
# Advice aimed at TorchRec's own developers ("construct Topology via TopologyFactory", "dry run estimate"): noise here.
for _noisy in ("torchrec.distributed.planner", "torch.fx._symbolic_trace", "torchrec.distributed.model_parallel"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def run_rank(
    ctx: DistContext,
    data_dir: str,
    run_dir: str,
    resolved: dict[str, Any],
    cfg: TrainConfig,
    params: ModelParams,
    resume: bool,
) -> None:
    """Train on this rank (`launch` calls it once per rank)."""
    Training(ctx, Path(data_dir), Path(run_dir), resolved, cfg, params).run(resume)


class Training:
    """A rank's model, optimizers, loaders and loop state (``state``, what a checkpoint generation saves)."""

    def __init__(
        self,
        ctx: DistContext,
        data_dir: Path,
        run: Path,
        resolved: dict[str, Any],
        cfg: TrainConfig,
        params: ModelParams,
    ) -> None:
        keep_freed_memory()  # the step's temporaries reuse the heap instead of fresh mmaps (ctr/malloc.py)
        self.ctx, self.run_dir, self.cfg = ctx, run, cfg
        self.info = info = DatasetInfo.load(data_dir)
        SequenceStore.open(info.data_dir)  # built once under a lock, before the loader workers of every rank open it
        ctx.barrier()
        if ctx.device.type == "cpu" and ctx.world_size > 1:  # N ranks on one host: split the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
        seed_everything(cfg.train.seed)
        self._build_model(params)
        self._build_loaders()
        steps_per_epoch = -(-self.train_loader.num_rows() // cfg.data.batch_size)
        planned = min(cfg.train.max_steps or math.inf, cfg.train.epochs * steps_per_epoch)
        compile_units(self.model, cfg.train.compile, int(planned), ctx.device)
        # best_score: the best validation GAUC (AUC when no validation user has both classes; best_metric says which)
        self.state: dict[str, Any] = {
            "step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": -math.inf, "best_step": -1, "bad_evals": 0,
            "validations": 0, "best_metric": None,
        }  # fmt: skip
        self.ckpt_dir = run / runs.CHECKPOINTS
        self.identity = {
            "world_size": ctx.world_size,
            "dataset_fingerprint": info.fingerprint,
            "data_dir": str(Path(data_dir).resolve()),
            "config": resolved["config"],
        }

    # ---- setup -------------------------------------------------------------------------------------------------
    def _build_model(self, params: ModelParams) -> None:
        """The model on the meta device, its sparse optimizer fused into backward, sharded by the planner."""
        import torch.distributed as dist
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        ctx, cfg = self.ctx, self.cfg
        self.model = model = build_model(cfg.model["name"], params, self.info, device=torch.device("meta"))
        apply_optimizer_in_backward(
            sparse_optimizer_class(cfg.optim.sparse), model.sparse_parameters(), {"lr": cfg.optim.sparse_lr}
        )
        topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type, local_world_size=ctx.world_size)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=single_rank_constraints(model, ctx))
        plan = planner.collective_plan(model, None, dist.GroupMember.WORLD)
        cpu_adam = ctx.device.type == "cpu" and cfg.optim.sparse == "adam"
        with cpu_tables.cpu_adam() if cpu_adam else nullcontext():  # FBGEMM refuses Adam on the CPU
            one_rank = SingleRankWrapper() if ctx.world_size == 1 else None  # no DDP around a world of one
            self.dmp = DistributedModelParallel(model, device=ctx.device, plan=plan, data_parallel_wrapper=one_rank)
        # how the sequence tables' look-up and fused update run on this rank (the run summary says it)
        self.cpu_table_groups = cpu_tables.install(self.dmp) if cfg.optim.sparse_cpu_kernel == "torch" else 0
        # one rank: no input/output dist, the model's item/category pairs side by side
        self.local_lookups = local_lookup.install(self.dmp, ctx.world_size, model.embedding_pairs())
        self.dense_params = [p for _, p in in_backward_optimizer_filter(self.dmp.named_parameters(), include=False)]
        self.dense_opt = dense_optimizer(cfg, self.dense_params)
        self.dense_step = DenseStep(self.dense_params, self.dense_opt, cfg.optim.clip_norm or 0.0)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.dense_opt, gamma=cfg.optim.lr_decay_per_epoch)

    def _build_loaders(self) -> None:
        ctx, cfg, info = self.ctx, self.cfg, self.info
        features = self.model.features()
        train_cfg = loader_config(cfg, self.model, train=True, world_size=ctx.world_size)
        eval_cfg = loader_config(cfg, self.model, train=False, world_size=ctx.world_size)
        # train.validation=false (a fixed budget, as the demo's): no validation pass, the last model is kept
        self.has_valid = bool(info.split_rows.get("valid")) and cfg.train.validation
        widest = cfg.data.batch_size * sum(v.length for v in train_cfg.views)
        if ctx.is_main and train_cfg.max_behaviors and widest > train_cfg.max_behaviors:
            log.warning(
                "data.max_batch_behaviors=%d: a batch of %d samples can hold up to %d padded behaviors here, so "
                "batches of long histories are cut into smaller ones, each a training step (train.max_steps counts "
                "them); raise the cap to keep batches whole if memory allows",
                train_cfg.max_behaviors, cfg.data.batch_size, widest,
            )  # fmt: skip
        shard = {"rank": ctx.rank, "world_size": ctx.world_size}
        self.train_loader = SplitLoader(info, "train", train_cfg, features, **shard)
        self.valid_loader = SplitLoader(info, "valid", eval_cfg, features, **shard)
        self.dummy = first_batch(info, "valid" if self.has_valid else "train", eval_cfg, features)
        budget = f"{cfg.train.epochs} epoch(s)" + (f" or {cfg.train.max_steps} steps" if cfg.train.max_steps else "")
        if not cfg.train.validation and ctx.is_main:
            log.info("train.validation=false: training for %s, no validation, keeping the last model", budget)
        elif not self.has_valid and ctx.is_main:
            log.warning(
                "%s has no validation split: training for the configured %s and keeping the last model (no early "
                "stopping)", info.data_dir, budget,
            )  # fmt: skip

    def _resume(self) -> None:
        """Model, optimizers, loop state and random streams from the newest complete checkpoint generation."""
        found = checkpoint.latest_complete(self.ckpt_dir)
        if found is None:
            raise ConfigError(
                f"--resume: no complete checkpoint in {self.ckpt_dir}. How to fix: train without --resume (--overwrite "
                "to start the run again), or set train.checkpoint_every"
            )
        gen, meta = found
        checkpoint.check_resumable(gen, meta, self.identity)
        saved = checkpoint.load_rank(gen, self.ctx.rank)
        copy_local_state(self.dmp.state_dict(), saved["model"], "model")
        copy_local_state(self.dmp.fused_optimizer.state_dict()["state"], saved["sparse_opt"], "sparse_opt")
        self._set_table_steps(saved.get("table_steps"))
        self.dense_opt.load_state_dict(saved["dense_opt"])
        self.scheduler.load_state_dict(saved["scheduler"])
        state = dict(saved["state"])
        if "best_gauc" in state:  # a checkpoint written before the score was named for what it holds
            state["best_score"] = state.pop("best_gauc")
            state.setdefault("best_metric", "gauc")
        self.state = state
        checkpoint.set_rng_state(saved["rng"])
        if self.ctx.is_main:
            log.info(
                "resumed from %s: step %d (epoch %d, batch %d)",
                gen, state["step"], state["epoch"], state["batch_in_epoch"],
            )  # fmt: skip

    def _set_table_steps(self, steps: list[int] | None) -> None:
        """Each table group's step count (FBGEMM's `iter`: Adam's bias correction counts it), which TorchRec's state
        dicts leave out. Checkpoints written before it was kept have none: the counts restart (Adam's first steps
        after such a resume are larger)."""
        groups = cpu_tables.tbes(self.dmp)
        if steps is None:
            return
        if len(steps) != len(groups):
            raise ConfigError(
                f"--resume: the checkpoint has {len(steps)} embedding table group(s) on rank {self.ctx.rank}, the "
                f"model {len(groups)}. How to fix: resume with the configuration the run was started with"
            )
        for tbe, step in zip(groups, steps, strict=True):
            tbe.iter.fill_(step)

    # ---- outputs -----------------------------------------------------------------------------------------------
    def save_generation(self) -> None:
        """One checkpoint generation: every rank's file, then (rank 0) the generation published as complete."""
        ctx, state = self.ctx, self.state
        gen = checkpoint.generation_dir(self.ckpt_dir, state["step"])
        payload = {
            "model": local_state(self.dmp.state_dict()),
            "sparse_opt": local_state(self.dmp.fused_optimizer.state_dict()["state"]),
            "table_steps": [int(tbe.iter) for tbe in cpu_tables.tbes(self.dmp)],
            "dense_opt": self.dense_opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": dict(state),
            "rng": checkpoint.rng_state(),
        }
        checkpoint.save_rank(gen, ctx.rank, payload)
        ctx.barrier()  # every rank's file is in place before the generation is published
        if ctx.is_main:
            meta = self.identity | {
                "step": state["step"],
                "epoch": state["epoch"],
                "batch_size": self.cfg.data.batch_size,
            }
            checkpoint.publish(gen, meta, self.cfg.train.keep_checkpoints)
        ctx.barrier()

    def export(self) -> None:
        """The unsharded weights as RUN_DIR/model.pt (every rank takes part in gathering them)."""
        weights = full_state_dict(self.dmp, self.ctx)
        if self.ctx.is_main:
            assert weights is not None
            tmp = self.run_dir / f".{runs.MODEL}.tmp"
            torch.save(weights, tmp)
            os.replace(tmp, self.run_dir / runs.MODEL)

    def validate(self) -> bool:
        """Score the valid split; export on improvement; returns True when training should stop."""
        if not self.has_valid:
            return False
        ctx, state = self.ctx, self.state
        t0 = time.time()
        state["validations"] += 1
        n_val = state["validations"]
        arrays = predict_distributed(
            self.dmp, self.valid_loader, ctx, self.dummy, self.cfg.train.eval_max_batches,
            on_batch=lambda i: fault("valid", n_val, ctx),
        )  # fmt: skip
        metrics = ctx.broadcast_object(validation_metrics(arrays) if arrays is not None else None)
        metric = next((m for m in ("gauc", "auc") if math.isfinite(metrics[m])), None)
        score = metrics[metric] if metric is not None else -math.inf
        improved = score > state["best_score"] or state["best_step"] < 0
        if improved:
            state["best_score"], state["best_step"], state["bad_evals"] = score, state["step"], 0
            state["best_metric"] = metric
            self.export()
        else:
            state["bad_evals"] += 1
        self.tlog.write(
            {"kind": "eval", "split": "valid", "step": state["step"], "epoch": state["epoch"], **metrics,
             "best": improved, "seconds": round(time.time() - t0, 2)}
        )  # fmt: skip
        if ctx.is_main:
            log.info(
                "valid @ step %d: AUC %.4f GAUC %.4f logloss %.4f%s",
                state["step"], metrics["auc"], metrics["gauc"], metrics["logloss"], " (best)" if improved else "",
            )  # fmt: skip
        return state["bad_evals"] >= self.cfg.train.patience

    # ---- the loop ----------------------------------------------------------------------------------------------
    def step(self, batch: Batch | None) -> tuple[dict[str, torch.Tensor], int] | None:
        """One optimizer step on this rank's `batch`; None when every rank has run dry (the epoch is over).

        A rank that ran dry first steps on a zero-weight copy of a batch so the collectives stay matched, and each
        rank's loss is weighted by its share of the step's samples (the gradient is the mean over every sample of
        the step, whoever held it). Returns the loss terms and the rank's sample count.
        """
        ctx = self.ctx
        n_local = 0 if batch is None else batch.size
        n_global = ctx.all_reduce_int(n_local, "sum")
        if n_global == 0:
            return None
        weight = n_local * ctx.world_size / n_global
        step_batch = (batch if batch is not None else self.dummy).to(ctx.device)
        with frozen_buffers(self.dmp) if batch is None else nullcontext():
            out = self.dmp(step_batch)
            terms = self.model.loss(out, step_batch)
            total = sum(terms.values())
            if weight != 1.0:
                total = total * weight
            self.dense_opt.zero_grad(set_to_none=True)
            total.backward()
        self.dense_step()  # clipping (optim.clip_norm) and the dense optimizer's step
        self.state["step"] += 1
        self.state["batch_in_epoch"] += 1
        return terms, n_local

    def log_window(self, epoch: int, terms: dict[str, float], samples_local: int, seconds: float) -> dict[str, Any]:
        """The train record of one logging window: each loss term's mean over every rank's samples."""
        samples = self.ctx.all_reduce_int(samples_local, "sum")
        # "loss" is the CTR term (BCE) of every model; each other term's window mean is logged as loss_<name>
        means = {n: self.ctx.all_reduce_float(v) / max(samples, 1) for n, v in sorted(terms.items())}
        rec = {
            "kind": "train",
            "step": self.state["step"],
            "epoch": epoch,
            "loss": means.get("ctr", math.nan),
            **{f"loss_{n}": v for n, v in means.items() if n != "ctr"},
            "samples_per_s": samples / max(seconds, 1e-9),
            "lr": self.dense_opt.param_groups[0]["lr"],
        }
        self.tlog.write(rec)
        return rec

    def train_epoch(self, epoch: int, seen: dict[str, list[np.ndarray]]) -> tuple[bool, bool, bool]:
        """Steps until the epoch ends, `train.max_steps` is reached or validation says stop.

        Returns (stop, the epoch ran to its end, the last step was validated)."""
        from tqdm import tqdm

        cfg, state, max_steps = self.cfg, self.state, self.cfg.train.max_steps
        self.train_loader.set_epoch(epoch)
        bar = tqdm(
            total=-(-self.train_loader.num_rows() // cfg.data.batch_size), initial=state["batch_in_epoch"],
            desc=f"epoch {epoch}", unit="step", disable=not self.ctx.is_main, mininterval=2.0, file=sys.stderr,
            dynamic_ncols=True,
        )  # fmt: skip
        it = iter(self.train_loader)
        for _ in range(state["batch_in_epoch"]):  # resume mid-epoch: skip what was already trained on
            next(it, None)
        window: dict[str, float] = {}
        window_samples, t_window = 0, time.time()
        stop = epoch_done = validated = False
        while not (max_steps is not None and state["step"] >= max_steps):
            batch = next(it, None)
            if cfg.train.record_samples and batch is not None:
                for k in seen:
                    seen[k].append(batch.dense[k].numpy())
            result = self.step(batch)
            if result is None:
                epoch_done = True
                break
            terms, n_local = result
            for name, term in terms.items():
                window[name] = window.get(name, 0.0) + float(term.detach()) * n_local
            window_samples += n_local
            bar.update(1)
            fault("train", state["step"], self.ctx)
            if state["step"] % cfg.train.log_every == 0:
                rec = self.log_window(epoch, window, window_samples, time.time() - t_window)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.0f}")
                window, window_samples, t_window = {}, 0, time.time()
            validated = bool(cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0)
            if validated:
                stop = self.validate()
            if validated or (cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0):
                self.save_generation()  # after this step's validation: its early-stopping state is in the generation
            if stop:
                break
        bar.close()
        return stop or (max_steps is not None and state["step"] >= max_steps), epoch_done, validated

    def run(self, resume: bool) -> None:
        """Resume if asked, train the epochs, export, and (rank 0) write the summary."""
        if resume:
            self._resume()
        self.tlog = JsonlLog(self.run_dir / runs.TRAIN_LOG, self.ctx.is_main)
        if resume:
            self.tlog.truncate_after(self.state["step"])  # records a killed run wrote after its checkpoint come again
        cfg, state = self.cfg, self.state
        stop = cfg.train.max_steps is not None and state["step"] >= cfg.train.max_steps
        seen: dict[str, list[np.ndarray]] = {"user_idx": [], "item_idx": [], "ts": []}
        self.dmp.train()
        while state["epoch"] < cfg.train.epochs and not stop:
            epoch = state["epoch"]
            stop, epoch_done, validated = self.train_epoch(epoch, seen)
            if not validated:
                stop = self.validate() or stop
            if epoch_done:
                if cfg.train.record_samples:
                    write_seen(self.run_dir, epoch, self.ctx.rank, seen)
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                self.scheduler.step()
            self.save_generation()
        if not self.has_valid:
            self.export()  # no validation split: the last model is the model
        self.tlog.close()
        if self.ctx.is_main:
            self._write_summary()

    def _write_summary(self) -> None:
        state, has_valid = self.state, self.has_valid
        why_last = "train.validation: false" if not self.cfg.train.validation else "the dataset has no validation split"
        summary = {
            "steps": state["step"],
            "epochs_done": state["epoch"],
            # the best validation score and what it is: GAUC, or AUC when no validation user had both classes
            "best_valid_metric": state.get("best_metric") if has_valid else None,
            "best_valid_score": state["best_score"] if has_valid else None,
            "best_step": state["best_step"] if has_valid else state["step"],
            "model": "best validation GAUC" if has_valid else f"last ({why_last})",
            "world_size": self.ctx.world_size,
            "dataset_fingerprint": self.info.fingerprint,
            # table groups whose look-up and fused update ran in ctr.train.cpu_tables (the rest: FBGEMM's kernels)
            "cpu_table_groups": self.cpu_table_groups,
            # embedding collections looked up without TorchRec's distribution steps (one rank: ctr.train.local_lookup)
            "local_lookups": self.local_lookups,
        }
        (self.run_dir / runs.SUMMARY).write_text(json.dumps(summary, indent=2))
        log.info("training done: %s", summary)
