"""The demo's quality claims, measured from its run directories (after `ctr demo --out DIR`).

For every model run under DIR/runs: test AUC and GAUC; AUC/GAUC on the shortest (0-50) and longest populated
length bucket; AUC on long-tail target items. Long tail = test samples whose target item is outside the most
popular items that together hold 80% of the *training* impressions (popularity is counted on the train split only,
so the test split does not define its own tail). Then the claims of the lifelong-models issue, each checked:

- every two-stage model (LAIN variants, ETA, SDIM and TWIN included) beats DIN over the last 50 on AUC and GAUC;
- MUSE beats SIM-hard on long-tail target items;
- TWIN beats SIM-soft and SIM-hard on AUC and GAUC (its paper's Table 4), TIN beats DIN (both over the last 50);
- TWIN-V2 beats TWIN on the longest length bucket (its life-cycle histories);
- DiffuMIN beats its ablation without the diffusion and contrastive losses (`diffumin_ablation`, where run);
- each LAIN variant improves the shortest length bucket over its backbone without losing the longest;
- DIN with semantic-ID items (`din_sid`, SentencePiece pieces; Singh et al., RecSys '24) beats DIN on long-tail
  target items and loses no overall AUC against it beyond noise ("without sacrificing overall model quality");
- where DARE variants were run (`<backbone>_dare`, `<backbone>_dare_att<N>`): DARE beats its backbone, and its
  narrower attention tables lose no AUC against the full width beyond noise.

A claim "a beats b" holds when the measured difference is > 0. Each difference comes with a paired bootstrap 95%
interval over users (`ctr.evaluation.metrics.paired_bootstrap`, 200 resamples): "significant" when it excludes 0.
"Without losing the longest" holds unless the longest bucket's AUC is significantly lower (interval below 0).

    python benchmarks/quality.py --demo out/demo [--results benchmarks/results/demo-quality.json] [--compare A:B ...]

Any directory with `data/` and `runs/<name>/` (predictions.parquet, metrics.json) works, e.g. the MovieLens runs.
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

from ctr.evaluation.metrics import (  # noqa: E402
    LENGTH_BUCKET_LABELS,
    auc,
    gauc,
    length_buckets,
    paired_bootstrap,
    to_jsonable,
)

BACKBONES_TWO_STAGE = ("sim_hard", "sim_soft", "muse", "r2led")
# the long-sequence zoo without LAIN variants (and DiffuMIN): they, too, are checked against DIN over the last 50
ZOO = ("eta", "sdim", "twin", "twin_v2", "diffumin")
TWO_STAGE = BACKBONES_TWO_STAGE + tuple(f"{n}_lain" for n in BACKBONES_TWO_STAGE) + ZOO
# TWIN against the SIM searches it replaces (its paper's Table 4: TWIN > SIM soft > SIM hard)
TWIN_VS = ("sim_soft", "sim_hard")
LAIN = {f"{n}_lain": n for n in ("din", "dien", *BACKBONES_TWO_STAGE)}
DARE = "_dare"  # DARE variants of a backbone, where run (benchmarks/dare.sh): <backbone>_dare, <backbone>_dare_att<N>


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
    p.add_argument(
        "--compare", action="append", default=[], metavar="A:B",
        help="also check 'run A beats run B on AUC and GAUC' (repeatable), e.g. an ablation against a baseline; "
        "A:B@BUCKET: on AUC within one hist_len bucket (e.g. 1K-10K)",
    )  # fmt: skip
    args = p.parse_args()
    demo = Path(args.demo)
    tail = long_tail_items(demo / "data")
    rows: dict[str, dict] = {}
    preds: dict[str, dict[str, np.ndarray]] = {}
    oracle = None
    for run in sorted((demo / "runs").iterdir()):
        if not (run / "predictions.parquet").exists():
            continue
        t = pq.read_table(run / "predictions.parquet").to_pydict()
        y, s = np.asarray(t["label"]), np.asarray(t["score"])
        u, item = np.asarray(t["user_idx"]), np.asarray(t["item_idx"])
        in_tail = tail[np.minimum(item, len(tail) - 1)]
        bucket = np.asarray(length_buckets(np.asarray(t["hist_len"])))
        preds[run.name] = {"y": y, "s": s, "u": u, "tail": in_tail, "bucket": bucket}
        m = json.loads((run / "metrics.json").read_text())
        populated = [b for b in LENGTH_BUCKET_LABELS if (m["buckets"][b]["samples"] or 0) > 0]
        oracle = m.get("oracle")
        rows[run.name] = {
            "auc": m["auc"],
            "gauc": m["gauc"],
            "logloss": m["logloss"],
            "gauc_users_used": m["gauc_users_used"],
            "gauc_users_skipped": m["gauc_users_skipped"],
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

    def delta(a: str, b: str, metric: str = "auc", subset: str | None = None, bucket: str | None = None) -> dict:
        pa, pb = preds[a], preds[b]
        keep = np.ones(len(pa["y"]), dtype=bool)
        if subset == "tail":
            keep = pa["tail"]
        if bucket is not None:
            keep = pa["bucket"] == LENGTH_BUCKET_LABELS.index(bucket)
        d = paired_bootstrap(pa["y"][keep], pa["s"][keep], pb["s"][keep], pa["u"][keep], metric=metric)  # type: ignore[arg-type]
        return {"delta": d.delta, "ci95": [d.lo, d.hi], "significant": d.significant}

    def fmt(d: dict) -> str:
        return f"{d['delta']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"

    def beats(a: str, b: str, claim: str) -> dict:
        """The claim "a beats b on AUC and GAUC", with both paired deltas."""
        da, dg = delta(a, b), delta(a, b, "gauc")
        return {
            "claim": claim,
            "holds": bool(da["delta"] > 0 and dg["delta"] > 0),
            "significant": bool(da["significant"] and dg["significant"]),
            "auc_delta": da,
            "gauc_delta": dg,
            "values": f"AUC {rows[a]['auc']:.4f} vs {rows[b]['auc']:.4f}, delta {fmt(da)}; "
            f"GAUC {rows[a]['gauc']:.4f} vs {rows[b]['gauc']:.4f}, delta {fmt(dg)}",
        }

    checks = []
    if "din" in rows:
        checks += [beats(n, "din", f"{n} beats din (last 50) on AUC and GAUC") for n in TWO_STAGE if n in rows]
    if "muse" in rows and "sim_hard" in rows:
        a, b = rows["muse"]["long_tail"], rows["sim_hard"]["long_tail"]
        dt = delta("muse", "sim_hard", subset="tail")
        checks.append(
            {
                "claim": "muse beats sim_hard on long-tail target items (AUC)",
                "holds": bool(dt["delta"] > 0),
                "significant": dt["significant"],
                "auc_delta": dt,
                "values": f"AUC {a['auc']:.4f} vs {b['auc']:.4f} on {a['samples']:,} samples, delta {fmt(dt)}",
            }
        )
    checks += [beats("twin", b, f"twin beats {b} on AUC and GAUC") for b in TWIN_VS if "twin" in rows and b in rows]
    if "twin_v2" in rows and "twin" in rows:  # life-cycle histories: the users with the longest histories
        lb = rows["twin"]["longest_bucket"]["bucket"]
        d_long, d_all = delta("twin_v2", "twin", bucket=lb), delta("twin_v2", "twin")
        checks.append(
            {
                "claim": f"twin_v2 beats twin on the longest histories ({lb}) (AUC)",
                "holds": bool(d_long["delta"] > 0),
                "significant": d_long["significant"],
                "auc_delta": d_long,
                "overall_auc_delta": d_all,
                "values": f"AUC {rows['twin_v2']['longest_bucket']['auc']:.4f} vs "
                f"{rows['twin']['longest_bucket']['auc']:.4f}, delta {fmt(d_long)}; overall delta {fmt(d_all)}",
            }
        )
    if "diffumin" in rows and "diffumin_ablation" in rows:  # its generator and calibrator, against neither
        checks.append(
            beats("diffumin", "diffumin_ablation", "diffumin beats its ablation (no L_d, no L_cl) on AUC and GAUC")
        )
    if "din_sid" in rows and "din" in rows:  # semantic-ID items: generalization to the tail, no overall loss
        dt, da = delta("din_sid", "din", subset="tail"), delta("din_sid", "din")
        checks.append(
            {
                "claim": "din_sid beats din on long-tail target items (AUC) and loses no overall AUC beyond noise",
                "holds": bool(dt["delta"] > 0 and da["ci95"][1] >= 0),
                "significant": dt["significant"],
                "auc_delta": dt,
                "overall_auc_delta": da,
                "values": f"long-tail AUC {rows['din_sid']['long_tail']['auc']:.4f} vs "
                f"{rows['din']['long_tail']['auc']:.4f}, delta {fmt(dt)}; overall delta {fmt(da)}",
            }
        )
    if "tin" in rows and "din" in rows:
        checks.append(beats("tin", "din", "tin beats din (both over the last 50) on AUC and GAUC"))
    for name in sorted(rows):  # DARE variants (runs named <backbone>_dare, <backbone>_dare_att<N>), when present
        if DARE not in name or name.split(DARE)[0] not in rows:
            continue
        base, full = name.split(DARE)[0], name.split(DARE)[0] + DARE
        checks.append(beats(name, base, f"{name} beats {base} (separate attention tables) on AUC and GAUC"))
        if name != full and full in rows:  # narrower attention tables against DARE at the full width
            d = delta(name, full)
            checks.append(
                {
                    "claim": f"{name} (narrower attention tables) loses no AUC against {full} beyond noise",
                    "holds": bool(d["ci95"][1] >= 0),
                    "significant": d["significant"],
                    "auc_delta": d,
                    "values": f"AUC {rows[name]['auc']:.4f} vs {rows[full]['auc']:.4f}, delta {fmt(d)}",
                }
            )
    for lain, base in LAIN.items():
        if lain in rows and base in rows:
            ls, bs = rows[lain]["shortest_bucket"], rows[base]["shortest_bucket"]
            ll, bl = rows[lain]["longest_bucket"], rows[base]["longest_bucket"]
            d_short = delta(lain, base, bucket=ls["bucket"])
            d_long = delta(lain, base, bucket=ll["bucket"])
            checks.append(
                {
                    "claim": f"{lain} improves the shortest bucket ({ls['bucket']}) over {base} "
                    f"without losing the longest ({ll['bucket']})",
                    "holds": bool(d_short["delta"] > 0 and d_long["ci95"][1] >= 0),
                    "significant": d_short["significant"],
                    "shortest_auc_delta": d_short,
                    "longest_auc_delta": d_long,
                    "values": f"shortest AUC {ls['auc']:.4f} vs {bs['auc']:.4f}, delta {fmt(d_short)}; "
                    f"longest AUC {ll['auc']:.4f} vs {bl['auc']:.4f}, delta {fmt(d_long)}",
                }
            )
    for pair in args.compare:
        spec, _, bucket = pair.partition("@")
        a, _, b = spec.partition(":")
        if a not in rows or b not in rows:
            raise SystemExit(f"--compare {pair}: no run {a if a not in rows else b!r} under {demo / 'runs'}")
        if not bucket:
            checks.append(beats(a, b, f"{a} beats {b} on AUC and GAUC"))
            continue
        if bucket not in LENGTH_BUCKET_LABELS:
            raise SystemExit(f"--compare {pair}: unknown length bucket {bucket!r}; one of {LENGTH_BUCKET_LABELS}")
        d = delta(a, b, bucket=bucket)
        checks.append(
            {
                "claim": f"{a} beats {b} on the {bucket} histories (AUC)",
                "holds": bool(d["delta"] > 0),
                "significant": d["significant"],
                "auc_delta": d,
                "values": f"delta {fmt(d)}",
            }
        )
    out = {
        "demo": str(demo),
        "oracle": oracle,
        "long_tail_definition": "target items outside the head holding 80% of train impressions",
        "models": rows,
        "checks": checks,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(to_jsonable(out), indent=2) + "\n")
    print("| model | test AUC | test GAUC | logloss | AUC shortest bucket | AUC longest bucket | AUC long-tail |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["auc"]):
        sb, lb = r["shortest_bucket"], r["longest_bucket"]
        print(
            f"| {name} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['logloss']:.4f} | {sb['auc']:.4f} ({sb['bucket']}) | "
            f"{lb['auc']:.4f} ({lb['bucket']}) | {r['long_tail']['auc']:.4f} |"
        )
    if oracle:
        print(f"| oracle (p_true) | {oracle['auc']:.4f} | {oracle['gauc']:.4f} | {oracle['logloss']:.4f} | | | |")
    any_row = next(iter(rows.values()))
    print(
        f"\nGAUC over {any_row['gauc_users_used']:,} test users with both classes "
        f"({any_row['gauc_users_skipped']:,} single-class users skipped); long-tail targets: "
        f"{any_row['long_tail']['samples']:,} test samples.\n"
    )
    print("Deltas: a - b with a paired bootstrap 95% interval over users (200 resamples).")
    for c in checks:
        verdict = "holds" if c["holds"] else "DOES NOT HOLD"
        if c["holds"]:
            verdict += " (significant)" if c["significant"] else " (not significant)"
        print(f"- {verdict}: {c['claim']} ({c['values']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
