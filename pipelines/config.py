"""Configuration of the dataset builder (`ctr build`): these defaults < ``--config FILE`` < ``--set key=value``.

The grammar (layering, ``--set``, error messages) is `features.config`'s, shared by every command;
`ctr build --print-config` prints the resolved config.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from features.config import ConfigError, StrictModel, deep_merge, layers, parse_set, read_yaml, validate

__all__ = ["BuildConfig", "ConfigError", "deep_merge", "load_build_config", "parse_set", "read_yaml"]


class SplitConfig(StrictModel):
    """Time-based split of impressions: explicit boundaries (seconds; valid_start_ts <= ts < test_start_ts is
    validation, ts >= test_start_ts is test), or, when both are null, the exact time quantiles
    1 - valid_fraction - test_fraction and 1 - test_fraction of the kept impressions."""

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


class RayConfig(StrictModel):
    num_cpus: int | None = Field(None, description="local Ray: null = all cores of this machine")
    object_store_mb: int | None = Field(
        None, description="local Ray object store, MiB (spills to disk beyond it); null = Ray's default, 30% of memory"
    )
    rows_per_task: int = Field(500_000, gt=0, description="raw rows validated per Ray task (whole row groups)")
    num_partitions: int | None = Field(
        None, gt=0, description="user partitions of the shuffle: null = max(2 x num_cpus, rows / rows_per_partition)"
    )
    rows_per_partition: int = Field(
        4_000_000, gt=0, description="log rows per partition when num_partitions is null (a reduce task holds one)"
    )


class OutputConfig(StrictModel):
    rows_per_row_group: int = Field(
        131_072, gt=0, description="Parquet row-group size of sample files (the loader streams row groups)"
    )
    overwrite: bool = Field(
        False, description="replace an existing dataset directory (only one written by ctr build: manifest.json)"
    )


class BuildConfig(StrictModel):
    split: SplitConfig = SplitConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()


def load_build_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BuildConfig:
    """Resolve the build config: the defaults above < `path` < `overrides` (``key=value`` strings)."""
    data, source = layers(path, overrides)
    return validate(BuildConfig, data, "build", source)
