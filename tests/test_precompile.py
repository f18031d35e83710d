"""`cli/precompile.py` (make setup): which modules it byte-compiles, without importing them here."""

from __future__ import annotations

from cli import precompile


def test_it_names_our_modules_and_the_dependencies_they_import_lazily():
    names = precompile.module_names()
    assert len(names) == len(set(names))
    for ours in ("ctr.train.worker", "features.loader", "pipelines.build", "kernels", "cli.demo_jobs"):
        assert ours in names
    # imported inside functions of ours (TorchRec's sharding, Ray Data) and by the tests (hypothesis)
    for lazy in ("torchrec.distributed.model_parallel", "ray", "pyarrow.parquet", "hypothesis"):
        assert lazy in names
    assert not any(n.endswith(".__main__") for n in names)  # a __main__ would run its command
    assert "cli.precompile" not in names and "conftest" not in names and "model_helpers" not in names


def test_the_two_processes_share_every_module_once():
    names = precompile.module_names()
    first, rest = precompile.split(names)
    assert sorted(first + rest) == sorted(names)
    assert "torch" in first and "ctr.models.din" in first and "ray" in rest
