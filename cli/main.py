"""The `ctr` command line: generate, import, build, train, evaluate, report, demo.

Each subcommand is a thin layer over one library function; the heavy imports (Ray, torch) happen inside the
subcommand so that `ctr --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _fmt_int(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def print_dataset_summary(manifest: dict[str, Any], out_dir: Path) -> None:
    """The human summary of a built dataset (what `ctr build` and `ctr demo` end with)."""
    print(f"\nDataset: {out_dir}")
    print(f"{'table':<12} {'rows in':>12} {'rows out':>12} {'quarantined':>12}")
    for name, t in manifest["tables"].items():
        counts = (_fmt_int(t[k]) for k in ("rows_in", "rows_out", "rows_quarantined"))
        print(f"{name:<12} " + " ".join(f"{c:>12}" for c in counts))
        for reason, n in t["quarantine_reasons"].items():
            print(f"{'':<12}   - {reason}: {n:,}")
    print("vocab sizes (incl. padding + OOV): " + ", ".join(f"{k}={v:,}" for k, v in manifest["vocab_sizes"].items()))
    sl = manifest["sequence_length"]
    if sl:
        print(
            f"sequence length per user: p50={sl['p50']:.0f} p90={sl['p90']:.0f} p99={sl['p99']:.0f} "
            f"max={sl['p100']:.0f}"
        )
    sp = manifest["split"]
    print(f"split boundaries: valid from ts {sp['valid_start_ts']}, test from ts {sp['test_start_ts']}")
    for split in ("train", "valid", "test"):
        s = sp[split]
        ctr = f"{s['positive_rate']:.4f}" if s["positive_rate"] is not None else "-"
        print(f"  {split:<6} {s['rows']:>10,} samples, CTR {ctr}")
    seconds = manifest.get("build_seconds", 0)
    behaviors = manifest["tables"]["behaviors"]["rows_in"]
    samples = manifest["tables"]["impressions"]["rows_in"]
    rate = f": {behaviors / seconds:,.0f} behaviors/s, {samples / seconds:,.0f} samples/s" if seconds else ""
    print(f"built in {seconds:.1f} s{rate}")


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.synthetic import generate, parse_overrides

    summary = generate(args.preset, args.seed, args.out, **parse_overrides(args.set or []))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipelines.config import parse_set
    from pipelines.importers import IMPORTERS

    summary = IMPORTERS[args.source](args.src, args.out, **parse_set(args.option or []))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from features.config import dump_yaml
    from pipelines.build import build_dataset
    from pipelines.config import load_build_config

    overrides = list(args.set or [])
    if args.overwrite:
        overrides.append("output.overwrite=true")
    cfg = load_build_config(args.config, overrides)
    if args.print_config:
        print(dump_yaml(cfg.model_dump(mode="json")), end="")
        return 0
    _require(args, "build", "raw", "out")
    manifest = build_dataset(args.raw, args.out, cfg, address=args.address)
    print_dataset_summary(manifest, Path(args.out))
    return 0


def cmd_sid(args: argparse.Namespace) -> int:
    from pipelines.sid import build_semantic_ids

    block = build_semantic_ids(
        Path(args.data), args.levels, args.codebook_size, seed=args.seed, iters=args.iters, missing=args.missing,
        method=args.method, steps=args.steps,
    )  # fmt: skip
    mse = ", ".join(f"{m:.4g}" for m in block["reconstruction_mse"])
    print(f"semantic IDs: {block['levels']} levels x {block['codebook_size']} codes ({args.method}) in {args.data}")
    space = "latent " if args.method == "rq-vae" else ""
    print(f"{space}reconstruction MSE by level: {mse}")
    if args.method == "rq-vae":
        print(f"decoder MSE: {block['decoder_mse']:.4g}; dead codes reset per level: {block['dead_code_resets']}")
    print("codebook use by level: " + ", ".join(f"{u:.1%}" for u in block["utilization"]))
    print("items with a unique prefix, by prefix length: " + ", ".join(f"{u:.1%}" for u in block["prefix_unique"]))
    print(f"collisions: {block['collision_rate_before']:.4%} of items before the suffix, 0 after")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from ctr import native
    from pipelines.cluster import build_clusters

    block = build_clusters(
        Path(args.data), max_size=args.max_size, block=args.block, seed=args.seed, address=args.address,
        tree=native.kmeans_tree,
    )  # fmt: skip
    print(
        f"clusters: {block['clusters']:,} for {block['behaviors']:,} behaviors of {block['users']:,} users "
        f"(blocks of {block['block']}, at most {block['max_size']} each) in {args.data}/clusters"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ctr.config import resolve_train_config
    from features.config import dump_yaml

    cfg, params = resolve_train_config(args.model, Path(args.config) if args.config else None, args.set)
    if args.print_config:
        print(dump_yaml(cfg.model_dump(mode="json")), end="")
        return 0
    _require(args, "train", "data", "out")
    from ctr.runs import SUMMARY
    from ctr.train.trainer import train

    run = train(
        Path(args.data), Path(args.out), cfg, params, nproc=args.nproc, resume=args.resume, overwrite=args.overwrite
    )
    if os.environ.get("RANK", "0") != "0":
        return 0  # one process of a torchrun job: rank 0 writes the summary and reports
    summary = json.loads((run / SUMMARY).read_text())
    name, steps, score = cfg.model["name"], summary["steps"], summary.get("best_valid_score")
    if score is None:
        print(f"trained {name}: {steps} steps; model kept: {summary['model']}")
    else:
        metric = (summary["best_valid_metric"] or "score").upper()
        print(f"trained {name}: {steps} steps, best valid {metric} {score:.4f}")
    print(f"run directory: {run}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ctr.evaluation.evaluate import evaluate_run

    for run in args.run:
        m = evaluate_run(Path(run), args.split)
        line = f"{run}: {args.split} AUC {m['auc']:.4f} GAUC {m['gauc']:.4f} logloss {m['logloss']:.4f}"
        if m.get("oracle"):
            line += f" (oracle AUC {m['oracle']['auc']:.4f} GAUC {m['oracle']['gauc']:.4f})"
        print(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ctr.report.render import render_report

    paths = render_report([Path(r) for r in args.runs], Path(args.out))
    print(f"report: {paths['html']}")
    return 0


DEMO_QUICK_SETS = ["train.max_steps=30", "train.log_every=5", "data.batch_size=128", "data.num_workers=0"]
# The full demo trains every registered model on the same budget (250 steps x 512 samples, about a third of an
# epoch of the demo world), so the whole job takes about 10 minutes on 2 cores (two models at a time, see
# cli/demo_jobs.py); `--set train.max_steps=null` trains
# full epochs. The demo compares models at 512 samples per step: its behavior cap (6M padded behaviors, above the
# widest demo batch, 512 x (10,000 + 50)) keeps every batch whole, where the 1M default would cut the two-stage
# models' batches into smaller steps and give them fewer samples than the others on the same step budget. On a
# fixed budget without early stopping a validation pass could only score the last model, which is the one kept
# either way: the demo skips it (`train.validation=false`; it was about a sixth of the demo's training jobs' time)
# and scores the test split. `--set train.validation=true` brings it back. Its jobs load batches in their own
# process (`data.num_workers=0`, training and test scoring): two jobs already keep both cores busy, so a loader
# process per job only added its start (a forkserver importing torch) and the batches' transfer; the batches and
# their order are the same either way.
DEMO_SETS = [
    "train.max_steps=250", "data.batch_size=512", "train.log_every=20", "data.max_batch_behaviors=6000000",
    "train.validation=false", "data.num_workers=0",
]  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo_jobs import JobFailed, JobResult, ModelJob, default_jobs, run_inline, run_jobs, warm_up
    from ctr.config import resolve_train_config
    from ctr.models import model_names
    from ctr.native import kmeans_tree
    from ctr.report.render import render_report
    from pipelines.build import build_dataset, ray_session
    from pipelines.cluster import build_clusters
    from pipelines.config import load_build_config
    from pipelines.outdirs import prepare_demo_dir
    from pipelines.sid import build_semantic_ids
    from pipelines.synthetic import generate

    out = Path(args.out)
    preset = "tiny" if args.quick else "demo"
    # only an empty directory or an earlier demo's (demo.json) is reused; its parts follow each command's own rules
    prepare_demo_dir(out, {"preset": preset, "seed": args.seed, "models": args.models, "quick": args.quick})
    raw, data, runs_dir = out / "raw", out / "data", out / "runs"
    models = args.models.split(",") if args.models else model_names()
    # the quick world's models train in seconds: one at a time in this process (a process start costs more)
    parallel, threads = default_jobs(len(models), args.nproc, jobs=args.jobs or (1 if args.quick else None))
    if parallel > 1:
        warm_up()  # the job server imports torch and TorchRec while the world is generated and built
    t0 = time.time()
    print(f"[1/5] generating the synthetic world (preset {preset}, seed {args.seed}) into {raw}")
    summary = generate(preset, args.seed, raw)
    print(
        f"      {summary['rows']['behaviors']:,} behaviors, {summary['rows']['impressions']:,} impressions, "
        f"oracle AUC {summary['oracle_auc']:.4f}"
    )
    print(f"[2/5] building the dataset into {data}")
    build_cfg = load_build_config(None, ["output.overwrite=true"])
    with ray_session(build_cfg):  # one Ray instance for the build and the clustering
        manifest = build_dataset(raw, data, build_cfg)
        print_dataset_summary(manifest, data)
        print(f"      semantic IDs for R2LED: {data / 'items.parquet'}")
        build_semantic_ids(data, seed=args.seed)
        if "twin_v2" in models:
            block = build_clusters(data, block=100 if args.quick else 1000, seed=args.seed, tree=kmeans_tree)
            n, covered = block["clusters"], block["behaviors"]
            print(f"      TWIN-V2 clusters: {n:,} for {covered:,} behaviors ({block['seconds']} s)")
    sets = (DEMO_QUICK_SETS if args.quick else DEMO_SETS) + [f"train.seed={args.seed}"] + list(args.set or [])
    for name in models:
        resolve_train_config(name, None, sets)  # a bad --set or model name fails here, before any job starts
    jobs = [
        ModelJob(name, str(data), str(runs_dir / name), sets, args.nproc, threads, str(out / "logs" / f"{name}.log"))
        for name in models
    ]
    how = f"{parallel} at a time, {threads} thread(s) each (logs: {out / 'logs'})" if parallel > 1 else "one at a time"
    print(f"[3/5] training {len(models)} models, each then scored on the test split: {how}")

    def done(r: JobResult, n: int, total: int) -> None:
        m = r.metrics
        print(
            f"      {r.job.name:<14} {r.seconds:6.0f} s  test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  ({n}/{total})",
            flush=True,
        )

    try:
        results = run_jobs(jobs, parallel, on_done=done) if parallel > 1 else run_inline(jobs, on_done=done)
    except JobFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    runs = [Path(r.job.run_dir) for r in results]
    print("[4/5] test split, every model")
    for r in results:
        m = r.metrics
        print(f"      {r.job.name:<14} AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  logloss {m['logloss']:.4f}")
    print("[5/5] writing the report")
    paths = render_report(runs, out / "report")
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"report: {paths['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctr", description="CTR prediction from lifelong user behavior.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write the synthetic lifelong world as raw tables")
    p.add_argument("--preset", choices=["tiny", "demo", "lifelong"], default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="raw directory to write")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one world parameter (repeatable)")
    p.set_defaults(func=cmd_generate)

    from pipelines.importers import PROTOCOLS

    p = sub.add_parser(
        "import",
        help="convert a public dataset into raw tables",
        description="Protocols:\n\n" + "\n\n".join(f"{k}: {v}" for k, v in PROTOCOLS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", choices=sorted(PROTOCOLS))
    p.add_argument("src", help="the source file or folder")
    p.add_argument("--out", required=True, help="raw directory to write")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="importer option, e.g. neg_per_pos=2")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("build", help="raw tables -> dataset directory (a Ray job)")
    p.add_argument("--raw", help="raw directory (items, behaviors, impressions)")
    p.add_argument("--out", help="dataset directory to write")
    p.add_argument("--config", help="YAML file layered over the defaults (see --print-config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("sid", help="semantic IDs of items (RQ-KMeans or RQ-VAE of mm_emb) in DATA_DIR/items.parquet")
    p.add_argument("--data", required=True, help="dataset directory (from ctr build)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations per level (rq-kmeans)")
    p.add_argument("--method", choices=["rq-kmeans", "rq-vae"], default="rq-kmeans", help="the quantizer")
    p.add_argument("--steps", type=int, default=3000, help="training steps of 1,024 items (rq-vae)")
    p.add_argument(
        "--missing",
        choices=["category", "reserved"],
        default="category",
        help="code of items without an embedding: their category's mean, or a reserved code",
    )
    p.set_defaults(func=cmd_sid)

    p = sub.add_parser("cluster", help="TWIN-V2's clusters of every user's history into DATA_DIR/clusters (a Ray job)")
    p.add_argument(
        "--data",
        required=True,
        help="dataset directory (from ctr build); items cluster by mm_emb, or by category without one",
    )
    p.add_argument("--max-size", type=_positive_int, default=20, help="behaviors per cluster at most (γ)")
    p.add_argument(
        "--block", type=_positive_int, default=1000, help="behaviors per block: the snapshot period (point in time)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("train", help="train one model on a dataset directory")
    p.add_argument("--data", help="dataset directory (from ctr build)")
    p.add_argument("--model", help="registered model name (see ctr/models/; --print-config shows its defaults)")
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--config", help="YAML layered over the model's defaults (see --print-config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument(
        "--nproc", type=_positive_int, default=1, help="processes (torch.distributed: gloo on CPU, nccl on GPU)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint (same --nproc)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in RUN_DIR (its outputs cleared)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a split with a run's best weights: predictions + metrics")
    p.add_argument("--run", required=True, action="append", help="run directory (repeatable)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="HTML + Markdown report comparing runs")
    p.add_argument("runs", nargs="+", help="run directories (evaluated)")
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the main job: generate -> build -> train every model -> evaluate -> report")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny world, few steps (a minute)")
    p.add_argument("--models", help="comma-separated model names (default: every registered model)")
    p.add_argument("--nproc", type=_positive_int, default=1)
    p.add_argument(
        "--jobs", type=_positive_int, default=None,
        help="models trained at a time, each in its own process with its share of the cores (default: one per core, "
        "at most 4)",
    )  # fmt: skip
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training override for every model")
    p.set_defaults(func=cmd_demo)
    return parser


def setup_logging(level: int, verbose: bool = False) -> None:
    """Our loggers at `level`; TorchRec and FBGEMM, which log every table's arguments at INFO on the root logger,
    at WARNING unless `verbose`."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ray").setLevel(level)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        for ours in ("ctr", "features", "pipelines", "cli"):
            logging.getLogger(ours).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO, args.verbose)
    from features.errors import UserError

    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: training processes are stopped, temporary files removed.
    signal.signal(signal.SIGTERM, terminate)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def terminate(signum: int, _frame: Any) -> None:
    """SIGTERM handler: unwind as on Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def _require(args: argparse.Namespace, command: str, *names: str) -> None:
    from features.errors import UserError

    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise UserError(f"ctr {command}: {' and '.join(missing)} required (or --print-config to show the config)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
