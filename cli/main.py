"""The `ctr` command line: generate, import, build, demo.

Each subcommand is a thin layer over one library function; the heavy imports (Ray, torch) happen inside the
subcommand so that `ctr --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
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
    print(f"built in {manifest.get('build_seconds', 0):.1f} s")


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.synthetic import generate

    summary = generate(args.preset, args.seed, args.out)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipelines.config import parse_set
    from pipelines.importers import IMPORTERS

    summary = IMPORTERS[args.source](args.src, args.out, **parse_set(args.option or []))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from pipelines.build import build_dataset
    from pipelines.config import load_build_config

    overrides = list(args.set or [])
    if args.overwrite:
        overrides.append("output.overwrite=true")
    cfg = load_build_config(args.config, overrides)
    manifest = build_dataset(args.raw, args.out, cfg, address=args.address)
    print_dataset_summary(manifest, Path(args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.build import build_dataset
    from pipelines.config import load_build_config
    from pipelines.synthetic import generate

    out = Path(args.out)
    preset = "tiny" if args.quick else "demo"
    raw, data = out / "raw", out / "data"
    t0 = time.time()
    print(f"[1/2] generating the synthetic world (preset {preset}, seed {args.seed}) into {raw}")
    summary = generate(preset, args.seed, raw)
    print(json.dumps(summary, indent=2))
    print(f"[2/2] building the dataset into {data}")
    manifest = build_dataset(raw, data, load_build_config(None, ["output.overwrite=true"]))
    print_dataset_summary(manifest, data)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; manifest: {data / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctr", description="CTR prediction from lifelong user behavior.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write the synthetic lifelong world as raw tables")
    p.add_argument("--preset", choices=["tiny", "demo", "lifelong"], default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="raw directory to write")
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

    p = sub.add_parser("build", help="raw tables -> dataset directory (Ray Data job)")
    p.add_argument("--raw", required=True, help="raw directory (items, behaviors, impressions)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--config", help="YAML file layered over configs/build.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("demo", help="the main job on the embedded default: generate -> build")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny world (seconds)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ray").setLevel(max(level, logging.WARNING) if args.quiet else level)
    from pipelines.config import ConfigError
    from pipelines.importers import ImportSourceError
    from pipelines.validate import DataError

    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, ImportSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
