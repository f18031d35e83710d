"""Pipeline benchmark: `ctr build` against the two usual alternatives, side by side in one run, on growing worlds.

For each world (the demo preset scaled in users and items: `--scales 1 3 10 30` by default) it runs, each in its
own process, the jobs chosen with `--jobs`:

- `build`: `ctr build` (the Ray job), which stores each user's sequence once and gives samples a `hist_len`;
- `naive`: polars `join_asof` of impressions to the user's behavior history and, per sample, the last 1000
  behaviors (item, cate, ts) materialized into the sample row (the in-memory shortcut);
- `spark`: how ads teams do it today, a PySpark job (`benchmarks/spark_build.py`: local[2], 8 GiB driver) that
  writes the same outputs as `ctr build` with window functions. pyspark (the `bench` extra of pyproject.toml) and a
  JRE (Debian's default-jre-headless) are installed by this script when missing.

Reported per job: wall seconds, behaviors/s and samples/s (input rows over wall time), bytes written (everything
the job left in its output directory: for Spark that includes its .crc and _SUCCESS files), and peak memory as PSS
sampled every 0.5 s: of the whole process tree (Ray's workers and object store, Spark's JVM), of the root process
alone (`driver_peak_pss_bytes`: the Python driver; for Spark the Python process, with the JVM that it starts as its
child reported apart as `jvm_peak_pss_bytes`). Per-stage seconds (`stages`) and `shuffle_bytes` are copied from the
job's manifest when it has them. A job that fails or runs past `--timeout` is recorded with its error and the run
goes on; the results JSON is written after every job. The naive baseline is skipped when its output would not fit
on disk; the projected size is then reported instead (samples x mean(min(hist_len, 1000)) x 16 bytes, from the
`ctr build` output of the same world).

At scale 1 (and in `--check` mode, on a tiny world with injected bad rows and duplicates) the Spark output is
compared with the `ctr build` output of the same world: rows per split, quarantined rows per table (and reason),
the hist_len multiset per split, the sequence length of every user (joined on raw user ids), and, exactly, the
vocabularies, split boundaries, samples and sequences.

    python benchmarks/pipeline.py [--out /tmp/lifelong-ctr-bench] [--scales 1 3 10 30] [--jobs build naive spark]
        [--timeout 3600] [--plot] [--merge]
    python benchmarks/pipeline.py --check          # the Spark job against ctr build on a tiny world
    python benchmarks/pipeline.py --plot-only      # redraw benchmarks/results/pipeline.png from the JSON

Writes benchmarks/results/pipeline.json (and pipeline.png with --plot) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, JobError, dir_bytes, machine_info, run_measured  # noqa: E402
from spark_check import compare_datasets, dirty_world  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 1000
NAIVE_BYTES_PER_POSITION = 4 + 4 + 8  # item int32, cate int32, ts int64
JOBS = {
    "build": "ctr build (sequence store + hist_len)",
    "naive": "naive: join_asof + last-1000 per sample",
    "spark": "spark: PySpark window functions (local[2])",
}


# --------------------------------------------------------------------------------------------------------------------
# the jobs' environment: the bench extra (pyspark) and a JRE
# --------------------------------------------------------------------------------------------------------------------
def bench_requirements() -> list[str]:
    """The `bench` extra of pyproject.toml (the one place its pins live)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(data["project"]["optional-dependencies"]["bench"])


def ensure_bench_deps() -> None:
    """Install what the Spark job needs when it is missing: the bench extra with pip (into this interpreter's
    environment, like `pip install -e .[bench]` would), and a JRE from Debian's packages when `java` is not found."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    missing = []
    for spec in bench_requirements():
        req = Requirement(spec)
        try:
            if version(req.name) in req.specifier:
                continue
        except PackageNotFoundError:
            pass
        missing.append(spec)
    if missing:
        print(f"installing {missing}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
    if shutil.which("java") is None:
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        if shutil.which("apt-get") is None:
            raise RuntimeError("the Spark job needs a JRE (java on PATH); install one, e.g. default-jre-headless")
        print("installing a JRE (apt-get install default-jre-headless)", flush=True)
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "default-jre-headless"],
            check=True,
            env=env,
        )


# --------------------------------------------------------------------------------------------------------------------
# the naive baseline (run in a child process)
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# the Spark output against the ctr build output
# --------------------------------------------------------------------------------------------------------------------
def build_cmd(raw: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", "-q", "build", "--raw", str(raw), "--out", str(out)]


def spark_cmd(raw: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "spark_build.py"), "--raw", str(raw), "--out", str(out)]


def _src_env(src: Path | None) -> tuple[Path, dict[str, str] | None]:
    """Where `ctr build` runs from: this checkout, or `--build-src` (e.g. an exported commit) first on the path."""
    return (ROOT, None) if src is None else (src, os.environ | {"PYTHONPATH": str(src)})


def _manifest_extras(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    return {k: manifest[k] for k in ("stages", "shuffle_bytes") if k in manifest}


def bench_world(scale: int, args: argparse.Namespace, work: Path, results: list[dict], save: Any) -> None:
    raw, data = work / f"raw-x{scale}", work / f"data-x{scale}"
    py = sys.executable
    if not raw.exists():
        overrides = "" if scale == 1 else f", n_users=10_000*{scale}, n_items=50_000*{scale}"
        gen = f"from pipelines.synthetic import generate; generate('demo', {args.seed}, {str(raw)!r}{overrides})"
        gen_stats = run_measured([py, "-c", gen], work / f"generate-x{scale}.log")
        print(f"x{scale}: generated in {gen_stats['seconds']} s", flush=True)
    source = json.loads((raw / "source.json").read_text())
    counts = source.get("rows") or source.get("counts") or {}
    behaviors, samples = counts.get("behaviors", 0), counts.get("impressions", 0)
    common = {"world": f"demo x{scale}", "scale": scale, "behaviors": behaviors, "samples": samples}
    common["generator_counts"] = counts

    def add(row: dict) -> dict:
        results.append(row)
        save()
        print(json.dumps(row), flush=True)
        return row

    def record(job: str, cmd: list[str], out: Path, src: Path | None = None) -> dict:
        """Run one job into `out` (removed first); a failure or timeout is recorded, not raised."""
        row = common | {"job": JOBS[job], "job_id": job}
        shutil.rmtree(out, ignore_errors=True)
        cwd, env = _src_env(src)
        try:
            stats = run_measured(cmd, work / f"{job}-x{scale}.log", args.timeout, cwd, env)
        except JobError as exc:
            return add(row | exc.stats | {"error": str(exc)})
        row |= stats | {
            "behaviors_per_s": round(behaviors / stats["seconds"]),
            "samples_per_s": round(samples / stats["seconds"]),
            "bytes_written": dir_bytes(out),
        }
        return add(row | _manifest_extras(out))

    for job in args.jobs:
        if job == "build":
            record("build", build_cmd(raw, data), data, args.build_src)
        elif job == "spark":
            out = work / f"spark-x{scale}"
            row = record("spark", spark_cmd(raw, out), out)
            if "error" not in row and scale == 1 and (data / "manifest.json").exists():
                row["check_vs_ctr_build"] = compare_datasets(data, out)
                save()
                print(f"x{scale}: spark vs ctr build: {json.dumps(row['check_vs_ctr_build'])}", flush=True)
        elif job == "naive":
            naive = work / f"naive-x{scale}"
            projected = _naive_projection(data)
            free = shutil.disk_usage(work).free
            if projected is not None and projected > 0.5 * free:
                skipped = f"projected output {projected / 1e9:.1f} GB > half the free disk ({free / 1e9:.0f} GB)"
                add(common | {"job": JOBS[job], "job_id": job, "skipped": skipped, "projected_bytes": projected})
                continue
            code = f"from benchmarks.pipeline import naive_baseline; naive_baseline({str(raw)!r}, {str(naive)!r})"
            record("naive", [py, "-c", code], naive)
            shutil.rmtree(naive, ignore_errors=True)


def _naive_projection(data: Path) -> int | None:
    """Bytes the naive job would write (samples x min(hist_len, 1000) positions), from the ctr build output."""
    if not (data / "manifest.json").exists():
        return None
    import polars as pl

    hist = pl.read_parquet(data / "samples" / "*" / "*.parquet", columns=["hist_len"])["hist_len"]
    return int(hist.clip(upper_bound=SEQ_LEN).sum()) * NAIVE_BYTES_PER_POSITION


def _gib(value: Any) -> str:
    return f"{value / 2**30:.2f} GiB" if value else ""


def table(results: list[dict]) -> str:
    lines = [
        "| world | job | behaviors | samples | wall s | behaviors/s | samples/s | bytes written | peak memory (tree) "
        "| peak memory (driver) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        head = f"| {r['world']} | {r['job']} | {r['behaviors']:,} | {r['samples']:,} |"
        if "skipped" in r:
            lines.append(f"{head} not run | | | projected {r['projected_bytes'] / 1e9:.1f} GB | | |")
            continue
        if "error" in r:
            what = f"timeout ({r['seconds']:.0f} s)" if r.get("timeout") else "failed"
            lines.append(
                f"{head} {what} | | | | {_gib(r.get('peak_pss_bytes'))} | {_gib(r.get('driver_peak_pss_bytes'))} |"
            )
            continue
        driver = _gib(r.get("driver_peak_pss_bytes"))
        if r.get("jvm_peak_pss_bytes"):
            driver = f"Python {driver}, JVM {_gib(r['jvm_peak_pss_bytes'])}"
        lines.append(
            f"{head} {r['seconds']:.1f} | {r['behaviors_per_s']:,} | {r['samples_per_s']:,} | "
            f"{r['bytes_written'] / 1e6:,.0f} MB | {_gib(r['peak_pss_bytes'])} | {driver} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Wall time vs behaviors (log-log), one line per job, throughput annotated at each job's largest world."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"build": ("C0", "o"), "spark": ("C3", "s"), "naive": ("C2", "^")}
    for job_id, label in JOBS.items():
        pts = sorted(
            (r["behaviors"], r["seconds"])
            for r in results
            if r.get("job_id", job_id if r["job"] == label else None) == job_id and "error" not in r and "seconds" in r
        )
        if not pts:
            continue
        color, marker = styles[job_id]
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, marker=marker, color=color, label=label, linewidth=2, markersize=7)
        ax.annotate(
            f"{x[-1] / y[-1] / 1e3:,.0f}K behaviors/s",
            (x[-1], y[-1]),
            textcoords="offset points",
            xytext=(9, -3),
            ha="left",
            color=color,
            fontsize=9,
        )
        for r in results:  # jobs that did not finish, at the height of the job's last finished point
            if r.get("job_id") == job_id and ("error" in r or "skipped" in r):
                what = "timeout" if r.get("timeout") else "skipped" if "skipped" in r else "failed"
                ax.plot([r["behaviors"]], [y[-1]], marker="x", color=color, markersize=9, linestyle="none")
                ax.annotate(what, (r["behaviors"], y[-1]), textcoords="offset points", xytext=(6, 6), color=color)
    worlds = sorted({(r["behaviors"], r["world"]) for r in results})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(worlds[0][0] / 1.6, worlds[-1][0] * 4)
    ax.set_xticks([b for b, _ in worlds], [f"{w.split()[-1]}\n{b / 1e6:.0f}M" for b, w in worlds])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.margins(y=0.15)
    ax.set_xlabel("behaviors in the world (demo preset, users and items scaled x1, x3, x10, x30)")
    ax.set_ylabel("wall time (s)")
    ax.set_title("Dataset build: wall time vs behaviors (2 cores, 24 GiB; log-log)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The Spark job against ctr build on a tiny world with bad rows and duplicates."""
    raw, data, out = work / "raw", work / "data", work / "spark"
    if not raw.exists():
        dirty_world(raw, args.seed)
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cwd, env = _src_env(args.build_src)
    b = run_measured(build_cmd(raw, data), work / "build.log", args.timeout, cwd, env)
    s = run_measured(spark_cmd(raw, out), work / "spark.log", args.timeout)
    return {"build_seconds": b["seconds"], "spark_seconds": s["seconds"], **compare_datasets(data, out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/lifelong-ctr-bench", help="scratch folder for worlds and datasets")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 3, 10, 30])
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per job; past it the job is ended")
    parser.add_argument("--results", default=str(RESULTS / "pipeline.json"))
    parser.add_argument("--plot", action="store_true", help="also draw benchmarks/results/pipeline.png")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plot from --results")
    parser.add_argument("--merge", action="store_true", help="keep the rows of --results that this run does not redo")
    parser.add_argument("--check", action="store_true", help="compare the Spark job with ctr build on a tiny world")
    parser.add_argument("--build-src", type=Path, help="run ctr build from this source tree (default: this checkout)")
    args = parser.parse_args()
    results_path = Path(args.results)
    png = results_path.with_suffix(".png")
    if args.plot_only:
        plot(json.loads(results_path.read_text())["results"], png)
        print(f"wrote {png}")
        return
    if "spark" in args.jobs or args.check:
        ensure_bench_deps()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    if args.check:
        result = check(work / "check", args)
        print(json.dumps(result, indent=2))
        sys.exit(0 if result["ok"] else 1)
    kept: list[dict] = []
    if args.merge and results_path.exists():
        redo = {(f"demo x{s}", JOBS[j]) for s in args.scales for j in args.jobs}
        kept = [r for r in json.loads(results_path.read_text())["results"] if (r["world"], r["job"]) not in redo]
    results: list[dict] = []
    machine = machine_info()

    def save() -> None:
        rows = sorted(
            kept + results,
            key=lambda r: (
                r.get("scale", 0),
                r["behaviors"],
                list(JOBS.values()).index(r["job"]) if r["job"] in JOBS.values() else 9,
            ),
        )
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))

    for scale in args.scales:
        bench_world(scale, args, work, results, save)
    rows = json.loads(results_path.read_text())["results"]
    if args.plot:
        plot(rows, png)
        print(f"wrote {png}")
    print(table(rows))


if __name__ == "__main__":
    main()
