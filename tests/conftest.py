from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests' own helpers (rawlog)

from paths import SHARED_DATA  # noqa: E402,F401  (re-exported for older imports)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails: a test that skips in CI does not exist. Only tests marked `gpu` may skip
    there (CI has no GPU); `.ci/run` installs what the others need (Chromium)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.get_closest_marker("gpu") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (only tests marked gpu may skip in CI): {report.longrepr}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (starting Ray costs seconds); builds reuse it."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, ray_local) -> Path:
    """The tiny synthetic world, generated and built once per test session and shared by pytest-xdist workers
    (a file lock in the common temp root), for the loader, model and trainer tests. Treat it as read-only."""
    from filelock import FileLock

    from pipelines.build import build_dataset
    from pipelines.config import load_build_config
    from pipelines.synthetic import generate

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's root, shared by every xdist worker (popen-gw0, popen-gw1, ...)
    data = root / "tiny-data"
    with FileLock(str(root / "tiny-data.lock")):
        if not (data / "manifest.json").exists():
            generate("tiny", 0, root / "tiny-raw")
            build_dataset(root / "tiny-raw", data, load_build_config(None, ["output.overwrite=true"]))
    return data


@pytest.fixture(scope="session")
def sid_data(tmp_path_factory, request) -> Path:
    """A copy of the tiny dataset (or ``$CTR_TEST_MODELS_DATA``) with `ctr sid`'s semantic IDs (3 x 256, what R2LED
    needs), built once per session and shared by the xdist workers like `tiny_data`. Treat it as read-only."""
    import shutil

    from filelock import FileLock

    from pipelines.sid import build_semantic_ids

    source = Path(os.environ.get("CTR_TEST_MODELS_DATA") or request.getfixturevalue("tiny_data"))
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    data = root / "tiny-data-sid"
    with FileLock(str(root / "tiny-data-sid.lock")):
        done = root / "tiny-data-sid.done"
        if not done.exists():
            shutil.rmtree(data, ignore_errors=True)
            shutil.copytree(source, data, ignore=shutil.ignore_patterns("_cache"))
            build_semantic_ids(data, levels=3, codebook_size=256)
            done.touch()
    return data


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on a small shared CPU run many times faster on one intra-op thread than on oversubscribed two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def info(request):
    prebuilt = os.environ.get("CTR_TEST_MODELS_DATA")
    from features.dataset import DatasetInfo

    return DatasetInfo.load(prebuilt or request.getfixturevalue("tiny_data"))


@pytest.fixture(scope="module")
def cluster_info(tiny_data, tmp_path_factory):
    """A copy of the tiny dataset with `ctr cluster`'s clusters (blocks of 40, at most 6 behaviors each)."""
    import shutil

    from features.dataset import DatasetInfo
    from pipelines.cluster import build_clusters

    data = tmp_path_factory.mktemp("clusters") / "data"
    shutil.copytree(tiny_data, data)
    build_clusters(data, max_size=6, block=40)
    return DatasetInfo.load(data)
