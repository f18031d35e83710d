"""The one config grammar (`features.config`) as build and train use it."""

from __future__ import annotations

import pytest

from cli.main import main as ctr
from ctr.config import resolve_train_config
from features.config import ConfigError, parse_set
from pipelines.config import BuildConfig, load_build_config


def test_set_values_are_yaml():
    assert parse_set(["a.b=3", "a.c=[64, 32]", "d=null", "e=x"]) == {
        "a": {"b": 3, "c": [64, 32]},
        "d": None,
        "e": "x",
    }
    for bad in (["novalue"], ["a..b=1"], ["a=1", "a.b=2"], ["a=[1,"]):
        with pytest.raises(ConfigError):
            parse_set(bad)


def test_layers_file_then_set(tmp_path):
    f = tmp_path / "build.yaml"
    f.write_text("split:\n  test_fraction: 0.2\nray:\n  num_cpus: 3\n")
    cfg = load_build_config(f, ["ray.num_cpus=1"])
    assert cfg.split.test_fraction == 0.2 and cfg.ray.num_cpus == 1
    # everything not given stays at the one set of defaults, the model's
    assert cfg.split.valid_fraction == BuildConfig().split.valid_fraction
    assert cfg.ray.rows_per_task == BuildConfig().ray.rows_per_task


def test_errors_name_every_bad_key_and_the_layers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  dens_lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        resolve_train_config("din", f, ["model.seq_len=abc"])
    msg = str(e.value)
    assert "optim.dens_lr: unknown key" in msg and str(f) in msg and "--set" in msg
    with pytest.raises(ConfigError) as e:
        resolve_train_config("din", None, ["model.seq_len=abc", "model.bogus=1"])
    assert "model.seq_len" in str(e.value) and "model.bogus: unknown key" in str(e.value)
    with pytest.raises(ConfigError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("a: [1,\n")
        load_build_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_build_config(tmp_path / "missing.yaml")


def test_partial_nested_override_keeps_the_variant_defaults():
    # din_lain's Params default to lain.enabled=true: overriding one LAIN key must not reset the others.
    cfg, params = resolve_train_config("din_lain", None, ["model.lain.prompts=3"])
    assert params.lain.enabled and params.lain.prompts == 3
    assert cfg.model["lain"]["enabled"] is True and cfg.model["lain"]["prompts"] == 3
    # the config carries every resolved model key (what the run directory records)
    assert set(cfg.model) == {"name", *type(params).model_fields}


def test_print_config(capsys):
    assert ctr(["train", "--model", "sim_soft", "--print-config", "--set", "model.k=7"]) == 0
    out = capsys.readouterr().out
    assert "name: sim_soft" in out and "k: 7" in out and "dense_lr: 0.001" in out
    assert ctr(["build", "--print-config", "--set", "ray.num_cpus=2"]) == 0
    assert "num_cpus: 2" in capsys.readouterr().out
    assert ctr(["build", "--out", "x"]) == 2  # --raw missing: a one-line error, not a traceback
    assert "--raw" in capsys.readouterr().err
