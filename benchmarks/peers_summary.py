"""`benchmarks/peers.py`'s results at a glance: every row of one or more runs held against the side-by-side target
(ours at least ``--target`` times FuxiCTR's training samples/s, test AUC not worse beyond the paired interval), as a
Markdown table, a JSON summary and a bar chart.

    python benchmarks/peers_summary.py movielens=benchmarks/results/peers-movielens-X.json \\
        demo-L50=benchmarks/results/peers-demo-L50-X.json [--target 2.0] [--json OUT.json] [--plot OUT.png]

Each argument is ``LABEL=FILE`` (or a bare FILE, labelled by its name; a label may hold ``=``). Per row:

* speed: ``ratio`` = ours / FuxiCTR samples/s (each side's median logged window after the first, as peers.py
  measures them, both in the one run); ``met`` where ratio >= target;
* quality: ``ahead`` where the 95% paired-bootstrap interval of ours − FuxiCTR in test AUC lies above 0, ``behind``
  where it lies below 0, ``level`` where it holds 0 (``unpaired`` where the two prediction sets could not be paired);
  the GAUC interval is shown beside it with the same words;
* ``meets``: speed met and AUC not behind.

Nothing is re-measured here: the figures are the runs', and a row is only as current as the run it comes from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# the sibling module, as a package's (imported as benchmarks.peers_summary) or from the script's own folder (run as a
# script): putting benchmarks/ on the path of an importing process would let its kernels.py (the kernel benchmark)
# shadow the `kernels` package the models import
if __package__:
    from benchmarks.peers_report import delta_text
else:
    from peers_report import delta_text

TARGET = 2.0  # issue 16: at least twice FuxiCTR's training samples/s


def quality_verdict(q: dict[str, Any] | None, metric: str) -> str:
    """``ahead`` / ``behind`` / ``level`` from the paired interval of ours − FuxiCTR, ``unpaired`` without one."""
    if not q or not q.get("paired") or metric not in q:
        return "unpaired"
    d = q[metric]
    if d["lo"] > 0:
        return "ahead"
    if d["hi"] < 0:
        return "behind"
    return "level"


def summarize(
    label: str, result: dict[str, Any], target: float = TARGET, source: str | None = None
) -> list[dict[str, Any]]:
    """One summary row per row of a peers.py result (its ``results`` list), in the run's order; ``source``: the
    results file it came from (the table's ``run`` column), so rows of several runs under one label stay apart."""
    rows = []
    settings = result.get("settings", {})
    for r in result["results"]:
        ours, fx = r["ours"], r["fuxictr"]
        ratio = ours["samples_per_s"] / fx["samples_per_s"]
        q = r.get("quality_delta")
        auc, gauc = quality_verdict(q, "auc"), quality_verdict(q, "gauc")
        rows.append({
            "dataset": label,
            "max_len": settings.get("max_len"),
            "model": r["model"],
            "ours_as": r["ours_variant"],
            "fuxictr": r["variant"],
            "ours_samples_per_s": ours["samples_per_s"],
            "fuxictr_samples_per_s": fx["samples_per_s"],
            "ratio": ratio,
            "ours_auc": ours["metrics"]["auc"],
            "fuxictr_auc": fx["metrics"]["auc"],
            "quality_delta": q,
            "speed": "met" if ratio >= target else "not met",
            "auc": auc,
            "gauc": gauc,
            "meets": ratio >= target and auc in ("ahead", "level"),
            "source": source,
        })  # fmt: skip
    return rows


def _quality_cell(r: dict[str, Any], metric: str) -> str:
    """``+0.0123 [+0.0050, +0.0190] ahead``: the paired interval (peers.py's own text) and its verdict."""
    text = delta_text(r["quality_delta"], metric)
    return text if r[metric] == "unpaired" else f"{text} {r[metric]}"


def markdown(rows: list[dict[str, Any]], target: float = TARGET) -> str:
    """The summary as one Markdown table, a line per row, and a last line counting the rows that meet the target."""
    head = (
        "| data | model | ours as | FuxiCTR | ours / FuxiCTR samples/s | ratio | AUC ours − FuxiCTR "
        f"| GAUC ours − FuxiCTR | ≥ {target:g}x, AUC not behind | run |\n|---|---|---|---|---:|---:|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['ours_as']} | {r['fuxictr']} | "
            f"{r['ours_samples_per_s']:,.0f} / {r['fuxictr_samples_per_s']:,.0f} | {r['ratio']:.2f}x | "
            f"{_quality_cell(r, 'auc')} | {_quality_cell(r, 'gauc')} | "
            f"{'yes' if r['meets'] else 'no: ' + _why_not(r)} | {Path(r['source']).stem if r['source'] else '-'} |"
        )
    met = sum(r["meets"] for r in rows)
    return head + "\n".join(lines) + f"\n\n{met} of {len(rows)} rows meet the target."


def _why_not(r: dict[str, Any]) -> str:
    why = []
    if r["speed"] != "met":
        why.append(f"{r['ratio']:.2f}x")
    if r["auc"] not in ("ahead", "level"):
        why.append(f"AUC {r['auc']}")
    return ", ".join(why)


def plot(rows: list[dict[str, Any]], path: Path, target: float = TARGET) -> None:
    """One panel per dataset: a bar per row (ours / FuxiCTR samples/s), the target as a line, the bar's colour the
    AUC verdict and its label the AUC difference; hatched where the speed target is missed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"ahead": "#2e7d32", "level": "#7f8c8d", "behind": "#c62828", "unpaired": "#bdbdbd"}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    tallest = max(sum(r["dataset"] == d for r in rows) for d in datasets)
    ncols = min(2, len(datasets))
    nrows = -(-len(datasets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.2 * ncols, (0.36 * tallest + 1.3) * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(datasets) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, datasets, strict=False):
        sub = [r for r in rows if r["dataset"] == name][::-1]
        top = max(max(r["ratio"] for r in sub), target) * 1.5  # each panel its own scale: 2x must stay readable
        labels = [f"{r['model']} ({r['ours_as']}) vs FuxiCTR {r['fuxictr']}" for r in sub]
        y = range(tallest - len(sub), tallest)  # a shorter panel's rows at its top
        for i, r in zip(y, sub, strict=True):
            ax.barh(i, r["ratio"], color=colors[r["auc"]], hatch=None if r["speed"] == "met" else "//",
                    edgecolor="black", linewidth=0.5)  # fmt: skip
            note = f"{r['ratio']:.2f}x"
            if r["auc"] != "unpaired":
                note += f", AUC {r['quality_delta']['auc']['delta']:+.3f}"
            ax.text(r["ratio"] + top * 0.01, i, note, va="center", fontsize=8)
        ax.axvline(target, color="black", linestyle="--", linewidth=1)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.set_ylim(-0.6, tallest - 0.4)
        ax.set_xlim(0, top)
        ax.set_xlabel("ours / FuxiCTR training samples/s (same run)")
        ax.set_title(name)
        ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(facecolor=c, edgecolor="black", label=f"AUC {k} (paired 95% interval)") for k, c in colors.items()
               if any(r["auc"] == k for r in rows)]  # fmt: skip
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label=f"below {target:g}x"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"Side by side with FuxiCTR 2.3.10: speed ratio (dashed: {target:g}x) and AUC verdict")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_source(arg: str) -> tuple[str, Path]:
    """``LABEL=FILE`` or ``FILE`` (labelled by its stem); the label may hold ``=`` itself (``demo L=50=FILE``): it
    ends at the first ``=`` after which an existing file is named."""
    for i, ch in enumerate(arg):
        if ch == "=" and Path(arg[i + 1 :]).is_file():
            return arg[:i], Path(arg[i + 1 :])
    return Path(arg).stem, Path(arg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="LABEL=FILE or FILE: a benchmarks/peers.py results JSON")
    p.add_argument("--target", type=float, default=TARGET, help="the speed ratio a row must reach (default 2)")
    p.add_argument("--json", type=Path, help="write the summary rows here")
    p.add_argument("--plot", type=Path, help="write the bar chart here (PNG)")
    args = p.parse_args(argv)
    rows = []
    for arg in args.results:
        label, file = parse_source(arg)
        if not file.is_file():
            p.error(f"{file}: no such results file (a benchmarks/peers.py --results output)")
        result = json.loads(file.read_text())
        if "results" not in result:
            p.error(f"{file}: not a benchmarks/peers.py result (no 'results' list)")
        rows += summarize(label, result, args.target, source=str(file))
    print(markdown(rows, args.target))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"target": args.target, "rows": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
