"""The report: the Markdown table printed at the end of a run, the earlier results kept by ``--merge``, and the
results file's name for a GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted, or an em dash when it was not measured."""
    return "—" if x is None else format(x, spec)


def _parity(p: dict[str, Any]) -> str:
    if "error" in p:
        return f"({p['error']})"
    if "positions_equal_fraction" in p:
        return f"pos {100 * p['positions_equal_fraction']:.1f}%"
    return f"{p['max_abs_diff']:.1e}"


def _mib(x: int | None) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The results and the goals of a report as Markdown tables."""
    c = report["ceilings"]
    lines = [
        f"# Kernels on {report['gpu']}",
        "",
        f"Ceilings (this run): copy {c['copy']['GBps']:.0f} GB/s, bf16 matmul {c['matmul_bf16']['TFLOPs']:.0f} TFLOP/s."
        f" B = {report['config']['batch']}, D = {report['config']['dim']}, K = {report['config']['k']};"
        " lengths uniform in [L/2, L].",
    ]
    if len(report.get("runs", [])) > 1:
        lines.append(
            f"Merged from {len(report['runs'])} runs; each row's % copy and % mm use the ceilings of its own run."
        )
    lines += [
        "",
        "| op | variant | L | N | Triton ms | GB/s | % copy | TFLOP/s | % mm | eager ms | x eager | compile ms "
        "| x compile | peak MiB Triton / eager / compile | parity vs eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        t, e, k = (r["impls"][name] for name in ("triton", "eager", "compile"))
        frac = t["bandwidth_fraction"]
        mmf = t["flops_fraction"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["op"],
                    r["variant"],
                    f"{r['L']:,}",
                    f"{r['shapes']['N_total']:,}",
                    fmt(t["median_ms"], ".3f") if not t["error"] else f"({t['error']})",
                    fmt(t["GBps"], ".0f"),
                    fmt(None if frac is None else 100 * frac, ".0f"),
                    fmt(t["TFLOPs"], ".2f"),
                    fmt(None if mmf is None else 100 * mmf, ".1f"),
                    fmt(e["median_ms"], ".3f") if not e["error"] else f"({e['error']})",
                    fmt(r["speedup_vs_eager"], ".1f"),
                    fmt(k["median_ms"], ".3f") if not k["error"] else f"({k['error']})",
                    fmt(r["speedup_vs_compile"], ".1f"),
                    f"{_mib(t['peak_extra_bytes'])} / {_mib(e['peak_extra_bytes'])} / {_mib(k['peak_extra_bytes'])}",
                    _parity(r.get("parity", {"error": "not run"})),
                ]
            )
            + " |"
        )
    lines += ["", "| goal | op | variant | L | value | met |", "|---|---|---|---:|---:|---|"]
    for g in report["goals"]:
        value = "—" if g["value"] is None else f"{g['value']:.2f}"
        met = {True: "yes", False: "NO", None: "n/a"}[g["met"]] + (f" ({g['note']})" if g.get("note") else "")
        lines.append(f"| {g['goal']} | {g['op']} | {g['variant']} | {g['L']:,} | {value} | {met} |")
    return "\n".join(lines)


def merge_previous(path: Path, gpu: str, replaced: set[tuple[str, int]]) -> tuple[list[dict], list[dict]]:
    """With --merge: the earlier results in ``path`` (same GPU) for the (op, L) pairs this run does not redo, and
    the earlier runs' records."""
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    if old.get("gpu") != gpu:
        raise ValueError(f"{path} holds results of {old.get('gpu')!r}, not of {gpu!r}: not merging")
    kept = [r for r in old.get("results", []) if (r["op"], r["L"]) not in replaced]
    return kept, list(old.get("runs", []))


def gpu_slug(name: str) -> str:
    """The GPU's name as it appears in the results file name (``kernels-<slug>.json``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
