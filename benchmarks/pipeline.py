"""Pipeline benchmark: `ctr build` (sequence store + prefix pointer) against a naive baseline, side by side.

For each world (the demo preset, and a world 10x larger in users and items) it runs, each in its own process:

- `build`: `ctr build` (the Ray job), which stores each user's sequence once and gives samples a `hist_len`;
- `naive`: the common alternative — polars `join_asof` of impressions to the user's behavior history and, per
  sample, the last 1000 behaviors (item, cate, ts) materialized into the sample row.

Reported per job: wall seconds, behaviors/s and samples/s (input rows over wall time), bytes written, and peak
memory of the job's whole process tree (sum of PSS, sampled every 0.5 s: Ray's workers and object store included).
The naive baseline is skipped when its output would not fit on disk; the projected size is then reported instead
(computed as samples x mean(min(hist_len, 1000)) x 16 bytes, and labelled as a projection).

    python benchmarks/pipeline.py --out /tmp/bench [--scales 1 10] [--seed 0]

Writes benchmarks/results/pipeline.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 1000
NAIVE_BYTES_PER_POSITION = 4 + 4 + 8  # item int32, cate int32, ts int64


def _tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def machine_info() -> dict:
    """Where a benchmark ran (kept with its results)."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd`, sampling the PSS of its process tree; returns wall seconds and peak bytes."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        ps = psutil.Process(proc.pid)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                try:
                    peak = max(peak, _tree_pss(ps))
                except psutil.NoSuchProcess:
                    return
                time.sleep(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log_path}")
    return {"seconds": round(time.time() - t0, 2), "peak_pss_bytes": peak}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def naive_baseline(raw: str, out: str) -> None:
    """The baseline job (run in a child process): join_asof + per-sample materialized last-1000 sequences,
    processed in user chunks so that memory stays bounded; output bytes grow as samples x 1000."""
    import polars as pl

    out_dir = Path(out)
    out_dir.mkdir(parents=True)
    beh = pl.scan_parquet(Path(raw) / "behaviors" / "*.parquet").select("user_id", "item_id", "ts")
    items = pl.scan_parquet(Path(raw) / "items.parquet").select("item_id", "cate_id")
    imp = pl.scan_parquet(Path(raw) / "impressions" / "*.parquet").select("user_id", "item_id", "ts", "label")
    users = imp.select("user_id").unique().collect()["user_id"].sort()
    n_chunks = max(1, len(users) // 2000)
    for k in range(n_chunks):
        ids = users[k::n_chunks]
        b = (
            beh.filter(pl.col("user_id").is_in(ids))
            .join(items, on="item_id", how="left")
            .sort("user_id", "ts")
            .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("pos"))
            .collect()
        )
        s = imp.filter(pl.col("user_id").is_in(ids)).sort("ts").collect()
        # join_asof: the number of behaviors strictly before each sample (the last one with b.ts < s.ts)
        s = s.join_asof(
            b.select("user_id", "ts", "pos").sort("ts"),
            on="ts",
            by="user_id",
            strategy="backward",
            allow_exact_matches=False,
        ).with_columns(pl.col("pos").fill_null(0).alias("hist_len"))
        seqs = b.group_by("user_id").agg("item_id", "cate_id", "ts")
        s = s.join(
            seqs.rename({"ts": "seq_ts", "item_id": "seq_item", "cate_id": "seq_cate"}), on="user_id", how="left"
        )
        start = (pl.col("hist_len") - SEQ_LEN).clip(lower_bound=0)
        length = pl.col("hist_len") - start
        s = s.with_columns(
            pl.col("seq_item").list.slice(start, length),
            pl.col("seq_cate").list.slice(start, length),
            pl.col("seq_ts").list.slice(start, length),
        )
        s.write_parquet(out_dir / f"part-{k:04d}.parquet")


def bench_world(scale: int, seed: int, work: Path, results: list[dict]) -> None:
    raw, data, naive = work / f"raw-x{scale}", work / f"data-x{scale}", work / f"naive-x{scale}"
    py = sys.executable
    if not raw.exists():
        overrides = "" if scale == 1 else f", n_users=10_000*{scale}, n_items=50_000*{scale}"
        gen = f"from pipelines.synthetic import generate; generate('demo', {seed}, {str(raw)!r}{overrides})"
        gen_stats = run_measured([py, "-c", gen], work / f"generate-x{scale}.log")
        print(f"x{scale}: generated in {gen_stats['seconds']} s", flush=True)
    source = json.loads((raw / "source.json").read_text())
    counts = source.get("rows") or source.get("counts") or {}
    shutil.rmtree(data, ignore_errors=True)
    stats = run_measured(
        [py, "-m", "cli.main", "-q", "build", "--raw", str(raw), "--out", str(data)], work / f"build-x{scale}.log"
    )
    manifest = json.loads((data / "manifest.json").read_text())
    behaviors = manifest["tables"]["behaviors"]["rows_in"]
    samples = manifest["tables"]["impressions"]["rows_in"]
    common = {"world": f"demo x{scale}", "behaviors": behaviors, "samples": samples, "generator_counts": counts}
    results.append(
        common
        | {
            "job": "ctr build (sequence store + hist_len)",
            **stats,
            "behaviors_per_s": round(behaviors / stats["seconds"]),
            "samples_per_s": round(samples / stats["seconds"]),
            "bytes_written": dir_bytes(data),
        }
    )
    print(json.dumps(results[-1]), flush=True)
    # the naive baseline writes samples x min(hist_len, 1000) positions
    import polars as pl

    hist = pl.read_parquet(data / "samples" / "*" / "*.parquet", columns=["hist_len"])["hist_len"]
    projected = int(hist.clip(upper_bound=SEQ_LEN).sum()) * NAIVE_BYTES_PER_POSITION
    free = shutil.disk_usage(work).free
    if projected > 0.5 * free:
        results.append(
            common
            | {
                "job": "naive: join_asof + last-1000 per sample",
                "skipped": f"projected output {projected / 1e9:.1f} GB > half the free disk ({free / 1e9:.0f} GB)",
                "projected_bytes": projected,
            }
        )
    else:
        shutil.rmtree(naive, ignore_errors=True)
        code = f"from benchmarks.pipeline import naive_baseline; naive_baseline({str(raw)!r}, {str(naive)!r})"
        nstats = run_measured([py, "-c", code], work / f"naive-x{scale}.log")
        results.append(
            common
            | {
                "job": "naive: join_asof + last-1000 per sample",
                **nstats,
                "behaviors_per_s": round(behaviors / nstats["seconds"]),
                "samples_per_s": round(samples / nstats["seconds"]),
                "bytes_written": dir_bytes(naive),
            }
        )
        shutil.rmtree(naive, ignore_errors=True)
    print(json.dumps(results[-1]), flush=True)


def table(results: list[dict]) -> str:
    lines = [
        "| world | job | behaviors | samples | wall s | behaviors/s | samples/s | bytes written | peak memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(
                f"| {r['world']} | {r['job']} | {r['behaviors']:,} | {r['samples']:,} | not run | | | "
                f"projected {r['projected_bytes'] / 1e9:.1f} GB | |"
            )
            continue
        lines.append(
            f"| {r['world']} | {r['job']} | {r['behaviors']:,} | {r['samples']:,} | {r['seconds']:.1f} | "
            f"{r['behaviors_per_s']:,} | {r['samples_per_s']:,} | {r['bytes_written'] / 1e6:,.0f} MB | "
            f"{r['peak_pss_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/lifelong-ctr-bench", help="scratch folder for worlds and datasets")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    args = parser.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for scale in args.scales:
        bench_world(scale, args.seed, work, results)
    machine = machine_info()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
