"""The run directory: what `ctr train` writes and `ctr evaluate` / `ctr report` read, in one place.

RUN_DIR/config.json        resolved config, dataset path and manifest fingerprint, world size, model name
RUN_DIR/train_log.jsonl    {"kind": "train", step, epoch, loss, loss_<term>, samples_per_s, ...}, {"kind": "eval", ...}
RUN_DIR/model.pt           best weights, unsharded (the last: no validation split, or train.validation false)
RUN_DIR/train_summary.json steps, epochs, best step and validation score, which model was kept, dataset fingerprint
RUN_DIR/checkpoints/       gen-<step>/rank<r>.pt + COMPLETE.json: one generation per checkpoint (train/checkpoint.py)
RUN_DIR/samples_seen/      epoch<e>-rank<r>.parquet, what each rank trained on (train.record_samples)
RUN_DIR/tensorboard/       when tensorboard is installed
RUN_DIR/.lock              held while training (a second training into the directory fails at once)
RUN_DIR/predictions*.parquet, metrics*.json   written by `ctr evaluate` (`prediction_path`, `metrics_path`)

Every reader and writer of these names goes through this module: the trainer, evaluation, the report and the CLI.
It imports the models and the config, never the trainer or evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.dataset import DatasetInfo
from features.errors import DatasetError
from features.outputs import check_no_overlap, claim_output_dir

from .config import ConfigError, TrainConfig

if TYPE_CHECKING:  # the models (TorchRec) are imported where a model is built: the report reads runs without them
    from .models import CTRModel, ModelParams

log = logging.getLogger(__name__)

CONFIG = "config.json"
TRAIN_LOG = "train_log.jsonl"
MODEL = "model.pt"
SUMMARY = "train_summary.json"
CHECKPOINTS = "checkpoints"
SAMPLES_SEEN = "samples_seen"


def prediction_path(run_dir: Path, split: str = "test") -> Path:
    """Where `ctr evaluate` writes a split's predictions: the test split gets the plain name."""
    return Path(run_dir) / ("predictions.parquet" if split == "test" else f"predictions-{split}.parquet")


def metrics_path(run_dir: Path, split: str = "test") -> Path:
    """Where `ctr evaluate` writes a split's metrics: the test split gets the plain name."""
    return Path(run_dir) / ("metrics.json" if split == "test" else f"metrics-{split}.json")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json as written by `ctr train` (a `DatasetError` when RUN_DIR holds no run)."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise DatasetError(f"{path}: not found; RUN_DIR must be a run directory written by `ctr train`")
    return json.loads(path.read_text())


def model_params(model_cfg: dict[str, Any]) -> ModelParams:
    """The model's validated Params from a ``model:`` section holding ``name`` and its keys (a stored run's config;
    `ctr.config.resolve_train_config` returns them already validated for a new run)."""
    from .models import get_model_class

    cls = get_model_class(model_cfg["name"])
    return cls.Params.model_validate({k: v for k, v in model_cfg.items() if k != "name"})


def build_model(name: str, params: ModelParams, info: DatasetInfo, device: torch.device | None = None) -> CTRModel:
    """The registered model `name` built from its validated `params` on dataset `info`."""
    from .models import get_model_class

    cls = get_model_class(name)
    if not isinstance(params, cls.Params):
        raise TypeError(f"{name}: params must be {cls.Params.__name__}, got {type(params).__name__}")
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
    folder = run / SAMPLES_SEEN
    folder.mkdir(exist_ok=True)
    table = pa.table({k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in seen.items()})
    pq.write_table(table, folder / f"epoch{epoch}-rank{rank}.parquet")
    for v in seen.values():
        v.clear()


RUN_OUTPUTS = (
    CONFIG,
    TRAIN_LOG,
    MODEL,
    f".{MODEL}.tmp",
    SUMMARY,
    CHECKPOINTS,
    "tensorboard",
    SAMPLES_SEEN,
    ".dist_store",
    ".dist_errors",
)


def claim_run(run_dir: Path, data_dir: Path, info: DatasetInfo, *, resume: bool, overwrite: bool, leader: bool) -> None:
    """May `ctr train` write `run_dir`? Never inside or around its dataset or raw directory; a resume needs a run
    there; a new run needs a new or empty directory, or an earlier run and `overwrite` (checked by the leader)."""
    check_no_overlap(run_dir, {"dataset directory": data_dir, "raw directory": info.manifest.get("raw_dir")})
    if resume:
        if not (run_dir / CONFIG).exists():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.json); train without --resume first")
    elif leader:
        claim_output_dir(run_dir, CONFIG, overwrite=overwrite, what="run directory")


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
    config_path = Path(run_dir) / CONFIG
    resolved = read_run_config(run_dir)
    cfg = TrainConfig.model_validate(resolved["config"])
    params = model_params(cfg.model)
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
    model = build_model(cfg.model["name"], params, info, device=torch.device("cpu"))
    weights_path = Path(run_dir) / MODEL
    if not weights_path.exists():
        raise DatasetError(f"{weights_path}: no trained weights; run `ctr train` into {run_dir} first")
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    return model, cfg, info
