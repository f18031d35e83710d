"""Training configuration: the defaults (the sections below and the model's ``Params``) < ``--config FILE`` <
``--set key=value``.

The ``model:`` section is validated by the model's own Params class (`ctr.models`), which holds the model's
defaults and their sources; ``data``, ``optim`` and ``train`` here. The grammar (layering, ``--set``, error
messages) is `features.config`'s; `ctr train --model NAME --print-config` prints the resolved config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from features.config import ConfigError, StrictModel, deep_merge, layers, validate

__all__ = ["ConfigError", "TrainConfig", "resolve_train_config"]


class DataSection(StrictModel):
    batch_size: int = Field(256, gt=0)
    eval_batch_size: int = Field(2048, gt=0)
    # loader worker processes per rank; null: `features.loader.loader_workers` (0 with at most 2 cores per rank)
    num_workers: int | None = Field(None, ge=0)
    shuffle_window: int = Field(8, gt=0, description="row groups mixed together when shuffling")
    # Memory is bounded by work, not by who the users are: a batch also holds at most this many padded behaviors
    # (samples x the longest slice, summed over the model's views); null = no cap.
    max_batch_behaviors: int | None = Field(1_000_000, gt=0, description="padded behaviors per training batch")
    eval_max_batch_behaviors: int | None = Field(1_000_000, gt=0, description="padded behaviors per eval batch")


class OptimSection(StrictModel):
    dense: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    dense_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_decay_per_epoch: float = Field(1.0, gt=0, le=1, description="dense lr *= this after each epoch")
    clip_norm: float | None = Field(10.0, description="max global norm of the dense gradients; null = off")
    sparse: Literal["adagrad", "rowwise_adagrad", "sgd", "adam"] = "adagrad"
    sparse_lr: float = Field(0.05, gt=0)
    sparse_cpu_kernel: Literal["torch", "fbgemm"] = Field(
        "torch",
        description="on the CPU, the look-up and fused update of the sequence tables: torch (ctr.train.cpu_tables, "
        "FBGEMM's update as sorted tensor operations) or fbgemm (FBGEMM's own CPU kernels, about 10x slower per "
        "distinct row); the same update either way. Only torch has Adam (optim.sparse=adam) on the CPU",
    )


class TrainSection(StrictModel):
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, description="stop after this many steps (all epochs); null = no limit")
    validation: bool = Field(
        True, description="score the valid split to keep the best model; false: no validation, the last model is kept"
    )
    eval_every: int | None = Field(None, description="validate every N steps; null = at each epoch's end")
    patience: int = Field(2, ge=1, description="early stop after this many validations without a better GAUC")
    seed: int = 0
    log_every: int = Field(20, gt=0)
    checkpoint_every: int | None = Field(None, description="also checkpoint every N steps (for --resume)")
    eval_max_batches: int | None = Field(None, description="cap validation batches (quick runs only)")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoint generations kept (newest first)")
    record_samples: bool = Field(False, description="write the (user, item, ts) each rank trained on, per epoch")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile DIN's activation unit (DIN, the two-stage models' short branch) for training; "
        "auto: true for CPU runs of at least 2,000 planned steps per rank where the native CPU operators "
        "(ctr/native, as fast) are unavailable (compiling takes seconds)",
    )

    @model_validator(mode="after")
    def _eval_every_needs_validation(self) -> TrainSection:
        if not self.validation and self.eval_every:
            raise ValueError("eval_every needs validation: drop train.eval_every or set train.validation=true")
        return self


class TrainConfig(StrictModel):
    run_name: str | None = None
    model: dict[str, Any]
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()


def resolve_train_config(
    model_name: str | None, user_file: Path | None = None, overrides: list[str] | None = None
) -> tuple[TrainConfig, Any]:
    """Layer the config and validate it; returns (TrainConfig with ``model`` holding every resolved key, the
    model's validated Params)."""
    from ctr.models import get_model_class

    user, source = layers(user_file, overrides)
    name = model_name or user.get("model", {}).get("name")
    if not name:
        raise ConfigError("no model given: pass --model NAME (or model.name in the config file)")
    try:
        cls = get_model_class(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from e
    merged = deep_merge(user, {"model": {"name": name}})
    cfg = validate(TrainConfig, merged, "train", source)
    # Over the Params' defaults, so a partial nested override (``--set model.lain.prompts=3``) keeps the other keys
    # of that section at their defaults (``din_lain``'s ``lain.enabled: true`` among them).
    defaults = cls.Params().model_dump(mode="json")
    model_kwargs = deep_merge(defaults, {k: v for k, v in cfg.model.items() if k != "name"})
    params = validate(cls.Params, model_kwargs, f"model {name}", source, prefix="model.")
    cfg.model = {"name": name, **params.model_dump(mode="json")}
    return cfg, params
