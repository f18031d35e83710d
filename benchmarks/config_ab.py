"""One model, two or more configurations, several seeds: test AUC / GAUC with each variant's paired bootstrap against
the first, per seed (the way a default is changed and reported here).

    python benchmarks/config_ab.py --data DATA_DIR --model dien --seeds 0,1,2 \\
        --set data.batch_size=1024 --set train.epochs=3 \\
        --variant popularity:model.aux_negatives=popularity --variant uniform:model.aux_negatives=uniform \\
        --work /tmp/config-ab --results benchmarks/results/dien-negatives-movielens.json

Every variant trains with ``ctr train`` (the `--set` overrides, then its own, then ``train.seed``; best validation
GAUC kept) and is scored on the test split by ``ctr evaluate``, one run after another; the first variant is the
reference. Per seed and variant: test AUC, GAUC and logloss; per seed, each other variant minus the reference with a
95% paired bootstrap interval over test users (`ctr.evaluation.metrics.paired_bootstrap`, 200 resamples); and how
many seeds favour it, how many significantly. Runs go to WORK/<variant>-s<seed> and are kept: a rerun skips a run
whose metrics are there (``--fresh`` trains again). Quality only: samples/s is recorded for orientation, the runs
were not timed side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctr.evaluation.metrics import paired_bootstrap, to_jsonable  # noqa: E402

KEYS = ["user_idx", "item_idx", "ts", "label"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` (or ``NAME:`` for the defaults) -> (name, overrides)."""
    name, sep, sets = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    overrides = [s for s in sets.split(",") if s]
    bad = [s for s in overrides if "=" not in s]
    if bad:
        raise argparse.ArgumentTypeError(f"--variant {name}: {bad[0]!r} is not KEY=VALUE")
    return name, overrides


def run_one(data: Path, run: Path, model: str, sets: list[str], fresh: bool) -> dict[str, Any]:
    """Train and evaluate one run (skipped when its metrics are there and not `fresh`); its test metrics."""
    if fresh or not (run / "metrics.json").exists():
        ctr = [sys.executable, "-m", "cli.main", "-q"]
        cmd = [*ctr, "train", "--data", str(data), "--model", model, "--out", str(run), "--overwrite"]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, cwd=ROOT)
        subprocess.run([*ctr, "evaluate", "--run", str(run)], check=True, cwd=ROOT)
    m = json.loads((run / "metrics.json").read_text())
    logs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    sps = [r["samples_per_s"] for r in logs if r.get("kind") == "train" and "samples_per_s" in r]
    return {
        "run": str(run),
        "auc": m["auc"],
        "gauc": m["gauc"],
        "logloss": m["logloss"],
        "samples_per_s": float(np.median(sps)) if sps else None,
    }


def compare(reference: Path, other: Path, resamples: int = 200) -> dict[str, Any]:
    """`other` minus `reference` on the same test samples: AUC and GAUC with their paired bootstrap intervals."""
    a = pq.read_table(other / "predictions.parquet").to_pandas()
    b = pq.read_table(reference / "predictions.parquet").to_pandas()
    if len(a) != len(b) or not (a[KEYS].to_numpy() == b[KEYS].to_numpy()).all():
        raise ValueError(f"{other} and {reference} did not score the same test samples in the same order")
    out = {}
    for metric in ("auc", "gauc"):
        d = paired_bootstrap(a["label"], a["score"], b["score"], a["user_idx"], metric=metric, resamples=resamples)
        out[metric] = to_jsonable(d)
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per variant but the reference: seeds where it is ahead, and where significantly (interval above 0) or
    significantly behind (below 0), for AUC and GAUC; the mean difference over seeds."""
    out: dict[str, Any] = {}
    names = list(result["variants"])[1:]
    for name in names:
        s: dict[str, Any] = {}
        for metric in ("auc", "gauc"):
            deltas = [result["seeds"][k]["delta"][name][metric] for k in result["seeds"]]
            s[metric] = {
                "mean_delta": float(np.mean([d["delta"] for d in deltas])),
                "seeds_ahead": sum(d["delta"] > 0 for d in deltas),
                "seeds_significantly_ahead": sum(d["lo"] > 0 for d in deltas),
                "seeds_significantly_behind": sum(d["hi"] < 0 for d in deltas),
                "seeds": len(deltas),
            }
        out[name] = s
    return out


def table(result: dict[str, Any]) -> str:
    names = list(result["variants"])
    ref = names[0]
    head = "| seed | " + " | ".join(f"{n} AUC / GAUC" for n in names)
    head += "".join(f" | {n} − {ref} AUC [95%] | {n} − {ref} GAUC [95%]" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + 2 * (len(names) - 1))]
    for seed, r in result["seeds"].items():
        cells = [f"{r['runs'][n]['auc']:.4f} / {r['runs'][n]['gauc']:.4f}" for n in names]
        for n in names[1:]:
            for metric in ("auc", "gauc"):
                d = r["delta"][n][metric]
                cells.append(f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a dataset directory built by `ctr build`")
    p.add_argument("--model", required=True)
    p.add_argument("--variant", action="append", type=parse_variant, required=True,
                   help="NAME:KEY=VALUE[,KEY=VALUE...]; the first is the reference (at least two)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    p.add_argument("--work", type=Path, default=Path("/tmp/lifelong-ctr-config-ab"))
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--fresh", action="store_true", help="train every run again")
    args = p.parse_args()
    names = [n for n, _ in args.variant]
    if len(args.variant) < 2 or len(set(names)) != len(names):
        p.error("give at least two --variant, each with its own name")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = dict(args.variant)
    result: dict[str, Any] = {
        "data": str(args.data),
        "model": args.model,
        "sets": args.set,
        "variants": variants,
        "reference": names[0],
        "method": "each variant minus the reference on the same test samples; 95% paired bootstrap over test users, "
        "200 resamples (ctr.evaluation.metrics.paired_bootstrap); best validation GAUC checkpoint of each run",
        "speed_note": "samples_per_s: median logged training window of each run, for orientation only (runs one "
        "after another, not side by side)",
        "seeds": {},
    }
    for seed in seeds:
        runs = {}
        for name, sets in variants.items():
            print(f"[{args.model}] {name} seed {seed}", flush=True)
            run = args.work / f"{name}-s{seed}"
            runs[name] = run_one(args.data, run, args.model, [*args.set, *sets, f"train.seed={seed}"], args.fresh)
        ref = Path(runs[names[0]]["run"])
        delta = {n: compare(ref, Path(runs[n]["run"])) for n in names[1:]}
        result["seeds"][str(seed)] = {"runs": runs, "delta": delta}
    result["summary"] = summarize(result)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    print(table(result))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
