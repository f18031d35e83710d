"""Builds for tests/test_build_faults.py, run in a fresh process (never where the test session's in-process Ray is
initialized): a Ray started here inherits this process's environment, fault hooks included.

    python tests/build_faults_helper.py local RAW OUT
        one build on a local Ray of 2 CPUs (the caller sets LIFELONG_CTR_FAULT_* in the environment)
    python tests/build_faults_helper.py cluster RAW OUT_PLAIN OUT_FAULTS FAULT_DIR
        a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster: a head and a second node, 1 CPU
        each); an undisturbed build into OUT_PLAIN, then, with FAULT_DIR created (which arms the fault hooks of
        LIFELONG_CTR_FAULT_KILL_STAGE), a build into OUT_FAULTS. Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.build import build_dataset  # noqa: E402
from pipelines.config import load_build_config  # noqa: E402

SETS = ["ray.num_partitions=4", "ray.rows_per_task=5000"]


def local(raw: Path, out: Path) -> None:
    build_dataset(raw, out, load_build_config(None, [*SETS, "ray.num_cpus=2", "ray.object_store_mb=200"]))


def cluster(raw: Path, out_plain: Path, out_faults: Path, fault_dir: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 1, "object_store_memory": 150 * 2**20, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=node_args)
    try:
        c.add_node(**{k: v for k, v in node_args.items() if k != "include_dashboard"})
        c.wait_for_nodes()
        cfg = load_build_config(None, SETS)
        build_dataset(raw, out_plain, cfg, address=c.address)
        fault_dir.mkdir(parents=True, exist_ok=True)  # arms the fault hooks for the second build
        ray.init(address=c.address, log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        cpus = ray.cluster_resources().get("CPU", 0)
        build_dataset(raw, out_faults, cfg, address=c.address)  # uses the connection made above
        ray.shutdown()
        print(json.dumps({"nodes": len(nodes), "cpus": cpus, "faults": sorted(p.name for p in fault_dir.iterdir())}))
    finally:
        c.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    mode, *paths = sys.argv[1:]
    if mode == "local":
        local(*map(Path, paths))
    elif mode == "cluster":
        cluster(*map(Path, paths))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
