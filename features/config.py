"""The one config grammar of every command: defaults < YAML file < `--set key=value`, validated by pydantic.

Defaults live in exactly one place, the pydantic models themselves (`pipelines.config.BuildConfig`,
`ctr.config.TrainConfig` and each model's ``Params``); `ctr build --print-config` and
`ctr train --model NAME --print-config` show them resolved. A YAML file and ``--set`` overrides are layered over
them with `deep_merge`; `validate` turns pydantic's errors into one `ConfigError` that names each key, what was
wrong and where the layers came from. Values of ``--set`` are parsed as YAML scalars or flow collections, so
``--set model.hidden=[64,32]`` and ``--set split.valid_start_ts=null`` mean what they say.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from features.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key, the file and what was expected."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors (a misspelled key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `override` merged into it, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["optim.dense_lr=0.01", "model.hidden=[64,32]"]`` -> ``{"optim": {"dense_lr": 0.01}, "model": ...}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.dense_lr=0.01")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key is empty or has an empty part (expected e.g. a.b=1)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML: {e}") from e
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} was given a value earlier and is not a section")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def explain(exc: ValidationError, what: str, source: str, prefix: str = "") -> ConfigError:
    """One `ConfigError` listing every invalid key of `exc` (keys are reported under `prefix`)."""
    lines = []
    for err in exc.errors():
        key = prefix + (".".join(str(p) for p in err["loc"]) or "<root>")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling; --print-config lists every key)")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError(f"invalid {what} config ({source}):\n" + "\n".join(lines))


def validate(model: type[M], data: dict[str, Any], what: str, source: str, prefix: str = "") -> M:
    """`model` validated from `data`, or a `ConfigError` naming every bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise explain(e, what, source, prefix) from None


def layers(file: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The user's layers over the defaults, merged: the file, then ``--set``; and a description of them."""
    data: dict[str, Any] = {}
    source = "defaults"
    if file is not None:
        data = read_yaml(file)
        source += f" < {file}"
    if overrides:
        data = deep_merge(data, parse_set(overrides))
        source += " < --set"
    return data, source


def dump_yaml(data: dict[str, Any]) -> str:
    """A resolved config as YAML, in the order of its fields (what ``--print-config`` prints)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
