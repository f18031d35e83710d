"""Training configuration: model defaults (configs/models/NAME.yaml) < user file < `--set key=value`.

The `model:` section is validated by the model's own Params class; `data`, `optim`, `train` here. Unknown keys
are errors that name the key and the file it came from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from features.errors import UserError

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "models"


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    batch_size: int = Field(256, gt=0)
    eval_batch_size: int = Field(2048, gt=0)
    num_workers: int = Field(1, ge=0)
    shuffle_window: int = Field(8, gt=0, description="row groups mixed together when shuffling")
    # Memory is bounded by work, not by who the users are: a batch also holds at most this many padded behaviors
    # (samples x the longest slice, summed over the model's views); null = no cap.
    max_batch_behaviors: int | None = Field(1_000_000, gt=0, description="padded behaviors per training batch")
    eval_max_batch_behaviors: int | None = Field(1_000_000, gt=0, description="padded behaviors per eval batch")


class OptimSection(_Section):
    dense: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    dense_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_decay_per_epoch: float = Field(1.0, gt=0, le=1, description="dense lr *= this after each epoch")
    clip_norm: float | None = Field(10.0, description="max global norm of the dense gradients; null = off")
    sparse: Literal["adagrad", "rowwise_adagrad", "sgd", "adam"] = "adagrad"
    sparse_lr: float = Field(0.05, gt=0)


class TrainSection(_Section):
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, description="stop after this many steps (all epochs); null = no limit")
    eval_every: int | None = Field(None, description="validate every N steps; null = at each epoch's end")
    patience: int = Field(2, ge=1, description="early stop after this many validations without a better GAUC")
    seed: int = 0
    log_every: int = Field(20, gt=0)
    checkpoint_every: int | None = Field(None, description="also checkpoint every N steps (for --resume)")
    eval_max_batches: int | None = Field(None, description="cap validation batches (quick runs only)")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoint generations kept (newest first)")
    record_samples: bool = Field(False, description="write the (user, item, ts) each rank trained on, per epoch")


class TrainConfig(_Section):
    run_name: str | None = None
    model: dict[str, Any]
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["optim.dense_lr=0.01", "model.hidden=[64,32]"]` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.dense_lr=0.01")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def model_defaults_path(name: str) -> Path:
    return CONFIG_ROOT / f"{name}.yaml"


def model_defaults(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """configs/models/NAME.yaml, layered over the files it names in ``base:`` (one name or a list, applied in order),
    so a variant states only what differs: ``sim_hard_lain.yaml`` is ``base: [sim_hard, _lain]`` (the backbone's
    defaults, then the shared LAIN block of ``_lain.yaml``). No file: ``{"model": {"name": NAME}}``."""
    path = model_defaults_path(name)
    if not path.exists():
        return {"model": {"name": name}}
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    out: dict[str, Any] = {}
    for base in bases:
        if not isinstance(base, str) or not model_defaults_path(base).exists():
            raise ConfigError(f"{path}: base must name files of {CONFIG_ROOT} (without .yaml), got {base!r}")
        if base in _seen or base == name:
            raise ConfigError(f"{path}: base {base!r} makes a cycle ({' -> '.join((*_seen, name, base))})")
        out = _merge(out, model_defaults(base, (*_seen, name)))
    return _merge(out, data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_train_config(
    model_name: str | None, user_file: Path | None = None, overrides: list[str] | None = None
) -> tuple[TrainConfig, Any]:
    """Layer the config and validate it; returns (TrainConfig, the model's validated Params)."""
    from ctr.models import get_model_class

    user = _read_yaml(user_file) if user_file else {}
    sets = parse_set(overrides or [])
    name = model_name or sets.get("model", {}).get("name") or user.get("model", {}).get("name")
    if not name:
        raise ConfigError("no model given: pass --model NAME (or model.name in the config file)")
    try:
        cls = get_model_class(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from e
    defaults = model_defaults(name)
    merged = _merge(_merge(defaults, user), sets)
    merged.setdefault("model", {})["name"] = name
    try:
        cfg = TrainConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_explain(e, "")) from e
    model_kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
    try:
        params = cls.Params.model_validate(model_kwargs)
    except ValidationError as e:
        raise ConfigError(_explain(e, "model.")) from e
    return cfg, params


def _explain(e: ValidationError, prefix: str) -> str:
    lines = []
    for err in e.errors():
        key = prefix + ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"config key {key!r} is not known (check the spelling; see configs/models/*.yaml)")
        else:
            lines.append(f"config key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)
