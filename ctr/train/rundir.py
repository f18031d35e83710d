"""The run directory: what `ctr train` writes and `ctr evaluate` / `ctr report` read, in one place.

RUN_DIR/config.json        resolved config, dataset path and manifest fingerprint, world size, model name
RUN_DIR/train_log.jsonl    {"kind": "train", step, epoch, loss, samples_per_s, ...} and {"kind": "eval", ...}
RUN_DIR/model.pt           best weights, unsharded (the last weights when the dataset has no validation split)
RUN_DIR/train_summary.json steps, epochs, best step and GAUC, which model was kept, the dataset fingerprint
RUN_DIR/checkpoints/       gen-<step>/rank<r>.pt + COMPLETE.json: one generation per checkpoint (checkpoint.py)
RUN_DIR/samples_seen/      epoch<e>-rank<r>.parquet, what each rank trained on (train.record_samples)
RUN_DIR/tensorboard/       when tensorboard is installed
RUN_DIR/.lock              held while training (a second training into the directory fails at once)
RUN_DIR/predictions*.parquet, metrics*.json   written by `ctr evaluate`
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.errors import DatasetError
from features.loader import DatasetInfo
from features.outputs import check_no_overlap, claim_output_dir

from ..models import CTRModel, get_model_class
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


def model_params(cfg: TrainConfig) -> Any:
    """The model's validated Params from the `model:` section of a resolved config."""
    cls = get_model_class(cfg.model["name"])
    return cls.Params.model_validate({k: v for k, v in cfg.model.items() if k != "name"})


def build_model(cfg: TrainConfig, params: Any, info: DatasetInfo, device: torch.device | None = None) -> CTRModel:
    cls = get_model_class(cfg.model["name"])
    return cls(params, info, device=device)


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


def write_seen(run: Path, epoch: int, rank: int, seen: dict[str, list[np.ndarray]]) -> None:
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


def claim_run(run_dir: Path, data_dir: Path, info: DatasetInfo, *, resume: bool, overwrite: bool, leader: bool) -> None:
    """May `ctr train` write `run_dir`? Never inside or around its dataset or raw directory; a resume needs a run
    there; a new run needs a new or empty directory, or an earlier run and `overwrite` (checked by the leader)."""
    check_no_overlap(run_dir, {"dataset directory": data_dir, "raw directory": info.manifest.get("raw_dir")})
    if resume:
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.json); train without --resume first")
    elif leader:
        claim_output_dir(run_dir, "config.json", overwrite=overwrite, what="run directory")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


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
