"""The semantic-ID paper's experiment on our data (Singh et al., RecSys '24; models-wave2.md B.3-B.4): random-hashed
item ids into a fixed table vs semantic-ID pieces at equal table sizes, overall, on new items and on the long tail.

Plan, fixed before any run (the paper's setting (b), a ranking model with user history; the paper replaces the item
ids of the history, the current and the candidate item, so ``item_repr: sid`` replaces them here too):

* host model: ``--model`` (DIN by default), its default config, trained on the dataset's train split with
  ``--budget`` (``demo``: the demo's `DEMO_SETS`, 250 steps x 512, seed 0; ``movielens``: 3 epochs as the README's
  MovieLens runs), best validation GAUC kept, scored on the test split;
* semantic IDs: the dataset's own (``ctr sid``; the demo builds 3 levels x 256 with RQ-KMeans for R2LED);
* variants (``rows`` = the rows of the item table):
    ``id``             one row per item id (the reference, no collisions)
    ``hash@R``         item ids randomly hashed into R rows (the paper's baseline), for every R of ``--sizes`` and
                       at unigram's size
    ``unigram``        one row per (level, code): L·K rows
    ``bigram@R``       non-overlapping pairs of levels, hashed into R rows with a salt per pair when K² exceeds R
    ``spm@R``          SentencePiece (BPE) pieces of the SID strings, vocabulary R
    ``id+spm@R``       the id row plus the SentencePiece pieces (the "augment" composition), at the middle size
* slices of the test split: every sample; **new items** (the paper's CTR/1D): samples whose item first appears in
  the dataset (as a behavior or an impression, any split) at or after the test split's start; **long tail**:
  samples whose item is outside the most popular items holding 80% of the training impressions;
* claims, each with a paired bootstrap 95% interval over users (200 resamples): at each size, a SID variant beats
  random hashing on AUC overall, on new items and on the long tail; SID (spm at the largest size) does not lose
  overall AUC against one row per id ("without sacrificing overall model quality"). Reported whether they hold or
  not. A slice with fewer than 200 samples or one class only has no AUC ("n/a").

    python benchmarks/sid.py --demo out/demo [--sizes 1024,4096,16384,65536] [--budget demo]
    python benchmarks/sid.py --demo /tmp/ml --sizes 1024,4096,16384 --budget movielens --name movielens

Runs go to DIR/sid-runs/<variant> (kept: a rerun skips finished variants); results to
``benchmarks/results/sid-<name>.json`` and the plot ``sid-<name>.png`` (AUC vs table size, overall and per slice).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import long_tail_items  # noqa: E402
from cli.main import DEMO_SETS  # noqa: E402
from ctr.evaluation.metrics import auc, paired_bootstrap, to_jsonable  # noqa: E402
from features.dataset import DatasetInfo  # noqa: E402

BUDGETS = {"demo": DEMO_SETS, "movielens": ["train.epochs=3"]}
MIN_SLICE = 200
SPEED_NOTE = (
    "samples_per_s is each run's median logged training throughput, recorded for orientation only: the variants ran "
    "one after another, not side by side, and may have shared the machine with other jobs; it is no speed comparison"
)


def variants(sizes: list[int], levels: int, num_codes: int) -> dict[str, list[str]]:
    """Variant name -> its `--set` overrides."""
    uni = levels * num_codes
    out: dict[str, list[str]] = {"id": []}
    for r in sorted({uni, *sizes}):
        out[f"hash@{r}"] = [f"model.item_rows={r}"]
    out["unigram"] = ["model.item_repr=sid", "model.sid.mode=unigram"]
    for r in sizes:
        out[f"bigram@{r}"] = ["model.item_repr=sid", "model.sid.mode=ngram", "model.sid.n=2", f"model.sid.rows={r}"]
    for r in sizes:
        out[f"spm@{r}"] = ["model.item_repr=sid", "model.sid.mode=spm", f"model.sid.rows={r}"]
    mid = sizes[len(sizes) // 2]
    out[f"id+spm@{mid}"] = ["model.item_repr=id+sid", "model.sid.mode=spm", f"model.sid.rows={mid}"]
    return out


def table_rows(name: str, levels: int, num_codes: int, n_items: int) -> int:
    if name == "id" or name.startswith("id+"):
        return n_items
    if name == "unigram":
        return levels * num_codes
    return int(name.split("@")[1])


def train_variant(demo: Path, run: Path, model: str, sets: list[str]) -> float:
    """Train and evaluate one variant (skipped when finished); returns the training samples/s (median of the logged
    windows)."""
    if not (run / "metrics.json").exists():
        ctr = [sys.executable, "-m", "cli.main"]
        cmd = [*ctr, "train", "--data", str(demo / "data"), "--model", model, "--out", str(run), "--overwrite"]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, cwd=ROOT)
        subprocess.run([*ctr, "evaluate", "--run", str(run)], check=True, cwd=ROOT)
    logs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in logs if r.get("kind") == "train"]
    return float(np.median(sps)) if sps else float("nan")


def slice_auc(y: np.ndarray, s: np.ndarray, keep: np.ndarray) -> float | None:
    if keep.sum() < MIN_SLICE or len(np.unique(y[keep])) < 2:
        return None
    return auc(y[keep], s[keep])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = [k for k in ("all", "new_items", "long_tail") if result["slices"][k]["samples"] >= MIN_SLICE]
    fig, axes = plt.subplots(1, len(slices), figsize=(5.2 * len(slices), 4.2), squeeze=False)
    rows = result["runs"]
    for ax, sl in zip(axes[0], slices, strict=True):
        for family, style in (("hash", "o-"), ("bigram", "s-"), ("spm", "^-")):
            pts = sorted((r["rows"], r["auc"][sl], *r["auc_range"][sl]) for n, r in rows.items()
                         if n.startswith(family + "@") and r["auc"][sl] is not None)  # fmt: skip
            if pts:
                x, v, lo, hi = (np.asarray(c) for c in zip(*pts, strict=True))
                label = family if family != "hash" else "random hash"
                ax.errorbar(x, v, yerr=[v - lo, hi - v], fmt=style, capsize=3, label=label)
        for name, marker in (("unigram", "D"), *[(n, "*") for n in rows if n.startswith("id+")]):
            if name in rows and rows[name]["auc"][sl] is not None:
                ax.plot([rows[name]["rows"]], [rows[name]["auc"][sl]], marker, markersize=9, label=name)
        if rows["id"]["auc"][sl] is not None:
            ax.axhline(rows["id"]["auc"][sl], color="gray", ls="--", label=f"id ({rows['id']['rows']:,} rows)")
        ax.set_xscale("log")
        ax.set_xlabel("item table rows")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{sl.replace('_', ' ')} ({result['slices'][sl]['samples']:,} samples)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Semantic IDs vs random hashing: {result['model']} on {result['name']} "
                 f"(mean of {len(result['seeds'])} seeds, bars: min-max)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, help="a directory with data/ (a dataset with `ctr sid` codes)")
    p.add_argument("--model", default="din")
    p.add_argument("--sizes", default="1024,4096,16384,65536", help="table sizes (rows), comma-separated")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="demo")
    p.add_argument("--name", default="demo", help="results file: benchmarks/results/sid-NAME.json")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (train.seed), comma-separated")
    args = p.parse_args()
    demo = Path(args.demo)
    info = DatasetInfo.load(demo / "data")
    codes, num_codes = info.sid_codes()
    levels = codes.shape[1]
    sizes = [int(x) for x in args.sizes.split(",")]
    plan = variants(sizes, levels, num_codes)
    sets_common = BUDGETS[args.budget]

    first = info.item_first_seen()
    test_start = int(info.manifest["split"]["test_start_ts"])
    tail = long_tail_items(demo / "data")
    seeds = [int(x) for x in args.seeds.split(",")]
    runs: dict[str, dict] = {}
    preds: dict[tuple[str, int], np.ndarray] = {}
    y = u = new = in_tail = None
    total, done = len(plan) * len(seeds), 0
    for seed in seeds:
        for name, sets in plan.items():
            run = demo / "sid-runs" / (name.replace("@", "_").replace("+", "_") + (f"-s{seed}" if seed else ""))
            t0 = time.time()
            sps = train_variant(demo, run, args.model, [*sets_common, f"train.seed={seed}", *sets])
            done += 1
            print(f"[{done}/{total}] {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
            t = pq.read_table(run / "predictions.parquet").to_pydict()
            if y is None:
                y, u = np.asarray(t["label"]), np.asarray(t["user_idx"])
                item = np.asarray(t["item_idx"])
                new = first[item] >= test_start
                in_tail = tail[np.minimum(item, len(tail) - 1)]
            assert u is not None and new is not None and in_tail is not None
            assert np.array_equal(np.asarray(t["label"]), y)  # every run scored the same samples in the same order
            s = np.asarray(t["score"])
            preds[(name, seed)] = s
            m = json.loads((run / "metrics.json").read_text())
            r = runs.setdefault(name, {
                "sets": sets, "rows": table_rows(name, levels, num_codes, info.vocab_sizes["item"]),
                "per_seed": {},
            })  # fmt: skip
            r["per_seed"][seed] = {
                "auc": {"all": m["auc"], "new_items": slice_auc(y, s, new), "long_tail": slice_auc(y, s, in_tail)},
                "gauc": m["gauc"],
                "samples_per_s": sps,
            }
    assert y is not None and u is not None and new is not None and in_tail is not None
    masks = {"all": np.ones(len(y), dtype=bool), "new_items": new, "long_tail": in_tail}
    for r in runs.values():  # means over the seeds (None where a slice has no AUC)
        per = list(r["per_seed"].values())
        r["auc"] = {sl: None if per[0]["auc"][sl] is None else float(np.mean([p["auc"][sl] for p in per]))
                    for sl in masks}  # fmt: skip
        r["auc_range"] = {sl: None if per[0]["auc"][sl] is None else
                          [min(p["auc"][sl] for p in per), max(p["auc"][sl] for p in per)] for sl in masks}  # fmt: skip
        r["gauc"] = float(np.mean([p["gauc"] for p in per]))
        r["samples_per_s"] = float(np.median([p["samples_per_s"] for p in per]))

    def delta(a: str, b: str, sl: str, metric: str = "auc") -> dict | None:
        """Per seed: a - b with a paired bootstrap 95% interval over users; then the mean over the seeds. Holds
        when the mean is > 0; significant when every seed's interval excludes 0 on the side of the mean."""
        keep = masks[sl]
        if keep.sum() < MIN_SLICE or len(np.unique(y[keep])) < 2:
            return None
        per = {}
        for seed in seeds:
            d = paired_bootstrap(y[keep], preds[(a, seed)][keep], preds[(b, seed)][keep], u[keep], metric=metric)  # type: ignore[arg-type]
            per[seed] = {"delta": d.delta, "ci95": [d.lo, d.hi]}
        mean = float(np.mean([d["delta"] for d in per.values()]))
        side = [(d["ci95"][0] > 0) if mean > 0 else (d["ci95"][1] < 0) for d in per.values()]
        return {"delta": mean, "significant": bool(all(side)), "per_seed": per}

    claims = []
    pairs = [("unigram", f"hash@{levels * num_codes}")]
    pairs += [(f"{fam}@{r}", f"hash@{r}") for r in sizes for fam in ("bigram", "spm")]
    for a, b in pairs:
        for sl in masks:
            d = delta(a, b, sl)
            claims.append({"claim": f"{a} beats {b} on AUC ({sl})", "slice": sl, "a": a, "b": b,
                           "holds": None if d is None else bool(d["delta"] > 0), "auc_delta": d})  # fmt: skip
    big = f"spm@{max(sizes)}"
    for cand in (big, *[n for n in plan if n.startswith("id+")]):
        d, dg = delta(cand, "id", "all"), delta(cand, "id", "all", "gauc")
        assert d is not None and dg is not None
        claims.append({
            "claim": f"{cand} loses no overall AUC against one row per id", "slice": "all", "a": cand, "b": "id",
            "holds": not (d["significant"] and d["delta"] < 0), "auc_delta": d, "gauc_delta": dg,
        })  # fmt: skip
    result = {
        "name": args.name,
        "model": args.model,
        "budget": sets_common,
        "seeds": seeds,
        "data": str(demo / "data"),
        "semantic_ids": {
            k: info.manifest["semantic_ids"].get(k)
            for k in ("method", "levels", "codebook_size", "utilization", "prefix_unique", "collision_rate_before")
        },
        "slices": {
            "all": {"samples": int(len(y)), "positives": int(y.sum())},
            "new_items": {
                "samples": int(new.sum()),
                "positives": int(y[new].sum()),
                "definition": "item first seen (behavior or impression) at or after test_start_ts",
            },
            "long_tail": {
                "samples": int(in_tail.sum()),
                "positives": int(y[in_tail].sum()),
                "definition": "item outside the top items holding 80% of train impressions",
            },
        },
        "samples_per_s_note": SPEED_NOTE,
        "runs": runs,
        "claims": claims,
    }
    out = ROOT / "benchmarks" / "results" / f"sid-{args.name}.json"
    out.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    plot(result, out.with_suffix(".png"))

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"\nslices: {json.dumps(result['slices'])}")
    print(f"{'variant':<16} {'rows':>8} {'AUC':>7} {'GAUC':>7} {'new':>7} {'tail':>7} {'samples/s':>10}")
    for name, r in runs.items():
        a = r["auc"]
        print(f"{name:<16} {r['rows']:>8,} {f(a['all']):>7} {f(r['gauc']):>7} {f(a['new_items']):>7} "
              f"{f(a['long_tail']):>7} {r['samples_per_s']:>10,.0f}")  # fmt: skip
    for c in claims:
        d = c["auc_delta"]
        txt = "n/a"
        if d is not None:
            per = ", ".join(
                f"{v['delta']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" for v in d["per_seed"].values()
            )
            txt = f"mean {d['delta']:+.4f}{' (significant)' if d['significant'] else ''}; per seed {per}"
        print(f"{c['claim']}: {'n/a' if c['holds'] is None else c['holds']} {txt}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
