"""The demo's quality claims, measured from its run directories (after `ctr demo --out DIR`).

For every model run under DIR/runs: test AUC and GAUC; AUC/GAUC on the shortest (0-50) and longest populated
length bucket; AUC on long-tail target items. Long tail = test samples whose target item is outside the most
popular items that together hold 80% of the *training* impressions (popularity is counted on the train split only,
so the test split does not define its own tail). Then the claims of the lifelong-models issue, each checked:

- every two-stage model beats DIN over the last 50 on AUC and GAUC;
- MUSE beats SIM-hard on long-tail target items;
- each LAIN variant improves the shortest length bucket over its backbone without losing the longest.

    python benchmarks/quality.py --demo out/demo [--results benchmarks/results/demo-quality.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctr.evaluation.metrics import LENGTH_BUCKET_LABELS, auc, gauc, to_jsonable  # noqa: E402

TWO_STAGE = ("sim_hard", "sim_soft", "muse", "r2led")
LAIN = {"din_lain": "din", "dien_lain": "dien"}


def long_tail_items(data: Path, head_share: float = 0.8) -> np.ndarray:
    items = pq.read_table(data / "samples" / "train", columns=["item_idx"])["item_idx"].to_numpy()
    counts = np.bincount(items)
    order = np.argsort(-counts, kind="stable")
    cum = np.cumsum(counts[order]) / counts.sum()
    head = order[: int(np.searchsorted(cum, head_share)) + 1]
    tail = np.ones(len(counts) + 1, dtype=bool)
    tail[head] = False
    return tail


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, help="the --out directory of `ctr demo`")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "demo-quality.json"))
    args = p.parse_args()
    demo = Path(args.demo)
    tail = long_tail_items(demo / "data")
    rows: dict[str, dict] = {}
    for run in sorted((demo / "runs").iterdir()):
        if not (run / "predictions.parquet").exists():
            continue
        t = pq.read_table(run / "predictions.parquet").to_pydict()
        y, s = np.asarray(t["label"]), np.asarray(t["score"])
        u, item = np.asarray(t["user_idx"]), np.asarray(t["item_idx"])
        in_tail = tail[np.minimum(item, len(tail) - 1)]
        m = json.loads((run / "metrics.json").read_text())
        populated = [b for b in LENGTH_BUCKET_LABELS if (m["buckets"][b]["samples"] or 0) > 0]
        rows[run.name] = {
            "auc": m["auc"],
            "gauc": m["gauc"],
            "shortest_bucket": {
                "bucket": populated[0],
                "auc": m["buckets"][populated[0]]["auc"],
                "gauc": m["buckets"][populated[0]]["gauc"],
            },
            "longest_bucket": {
                "bucket": populated[-1],
                "auc": m["buckets"][populated[-1]]["auc"],
                "gauc": m["buckets"][populated[-1]]["gauc"],
            },
            "long_tail": {
                "samples": int(in_tail.sum()),
                "auc": auc(y[in_tail], s[in_tail]),
                "gauc": gauc(y[in_tail], s[in_tail], u[in_tail]).value,
            },
        }
    checks = []
    din = rows.get("din")
    for name in TWO_STAGE:
        if name in rows and din:
            r = rows[name]
            checks.append(
                {
                    "claim": f"{name} beats din (last 50) on AUC and GAUC",
                    "holds": bool(r["auc"] > din["auc"] and r["gauc"] > din["gauc"]),
                    "values": f"AUC {r['auc']:.4f} vs {din['auc']:.4f}, GAUC {r['gauc']:.4f} vs {din['gauc']:.4f}",
                }
            )
    if "muse" in rows and "sim_hard" in rows:
        a, b = rows["muse"]["long_tail"], rows["sim_hard"]["long_tail"]
        checks.append(
            {
                "claim": "muse beats sim_hard on long-tail target items (AUC)",
                "holds": bool(a["auc"] > b["auc"]),
                "values": f"AUC {a['auc']:.4f} vs {b['auc']:.4f} on {a['samples']:,} samples",
            }
        )
    for lain, base in LAIN.items():
        if lain in rows and base in rows:
            ls, bs = rows[lain]["shortest_bucket"], rows[base]["shortest_bucket"]
            ll, bl = rows[lain]["longest_bucket"], rows[base]["longest_bucket"]
            checks.append(
                {
                    "claim": f"{lain} improves the shortest bucket ({ls['bucket']}) over {base} "
                    f"without losing the longest ({ll['bucket']})",
                    "holds": bool(ls["auc"] > bs["auc"] and ll["auc"] >= bl["auc"]),
                    "values": f"shortest AUC {ls['auc']:.4f} vs {bs['auc']:.4f}; longest AUC {ll['auc']:.4f} vs "
                    f"{bl['auc']:.4f}",
                }
            )
    out = {
        "demo": str(demo),
        "long_tail_definition": "target items outside the head holding 80% of train impressions",
        "models": rows,
        "checks": checks,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(to_jsonable(out), indent=2) + "\n")
    print("| model | test AUC | test GAUC | AUC 0-50 | AUC longest bucket | long-tail AUC |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['shortest_bucket']['auc']:.4f} | "
            f"{r['longest_bucket']['auc']:.4f} ({r['longest_bucket']['bucket']}) | {r['long_tail']['auc']:.4f} |"
        )
    print()
    for c in checks:
        print(f"- {'holds' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} ({c['values']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
