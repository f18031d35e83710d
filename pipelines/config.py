"""Configuration of the dataset builder: YAML defaults < user file < --set overrides, validated by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from features.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(UserError, ValueError):
    """A configuration problem, with the offending key in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(_Strict):
    valid_start_ts: int | None = None
    test_start_ts: int | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if not (0.0 <= self.valid_fraction < 1.0 and 0.0 <= self.test_fraction < 1.0):
            raise ValueError("valid_fraction and test_fraction must lie in [0, 1)")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError("valid_fraction + test_fraction must be < 1 (something must be left to train on)")
        if (self.valid_start_ts is None) != (self.test_start_ts is None):
            raise ValueError("give both valid_start_ts and test_start_ts, or neither")
        if self.valid_start_ts is not None and self.test_start_ts < self.valid_start_ts:  # type: ignore[operator]
            raise ValueError("test_start_ts must be >= valid_start_ts")
        return self


class RayConfig(_Strict):
    num_cpus: int | None = None
    object_store_mb: int | None = None
    rows_per_task: int = 500_000
    num_partitions: int | None = None
    rows_per_partition: int = 4_000_000


class OutputConfig(_Strict):
    rows_per_row_group: int = 131_072
    overwrite: bool = False


class BuildConfig(_Strict):
    split: SplitConfig = SplitConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`, recursing into nested mappings."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """Turn `["a.b=3", "c=x"]` into `{"a": {"b": 3}, "c": "x"}`; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set split.test_fraction=0.2")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key (check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" else ""))
    return ConfigError(f"invalid build config ({source}):\n" + "\n".join(lines))


def load_build_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BuildConfig:
    """Resolve the build config: configs/build.yaml < `path` < `overrides` (`key=value` strings)."""
    data = load_yaml(CONFIG_DIR / "build.yaml")
    source = "configs/build.yaml"
    if path is not None:
        data = deep_merge(data, load_yaml(path))
        source += f" < {path}"
    if overrides:
        data = deep_merge(data, parse_set(overrides))
        source += " < --set"
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from None
