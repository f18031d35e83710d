"""The report: the Markdown tables printed at the end of a run (results, first calls, registers and spills,
goals), the earlier results kept by ``--merge``, and the results file's name for a GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .common import result_key
from .goals import summarize_goals


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted, or an em dash when it was not measured."""
    return "—" if x is None else format(x, spec)


def _parity(p: dict[str, Any] | None) -> str:
    if p is None:
        return ""
    if "error" in p:
        return f"({p['error']})"
    if "positions_equal_fraction" in p:
        return f"pos {100 * p['positions_equal_fraction']:.1f}%"
    return f"{p['max_abs_diff']:.1e}"


def _peer_parity(r: dict[str, Any]) -> str:
    p = r.get("parity_fbgemm")
    if not p:
        return ""
    if "error" not in p["vs_reference"]:
        return _parity(p["vs_reference"])
    return f"{_parity(p['vs_triton'])} vs Triton"


def _mib(x: int | None) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def _ms(record: dict[str, Any] | None) -> str:
    if record is None:
        return ""
    return fmt(record["median_ms"], ".3f") if not record.get("error") else f"({record['error']})"


def _first(record: dict[str, Any] | None) -> str:
    return "" if record is None else fmt(record.get("first_call_s"), ".1f")


def _row(r: dict[str, Any]) -> str:
    impls = r["impls"]
    t, e, k, f = impls["triton"], impls["eager"], impls["compile"], impls.get("fbgemm")
    frac, mmf = t.get("bandwidth_fraction"), t.get("flops_fraction")
    n_total = r.get("shapes", {}).get("N_total")
    cells = [
        r["op"],
        r["variant"],
        fmt(r.get("B"), ",") if r.get("B") is not None else "—",
        r.get("dist") or "—",
        f"{r['L']:,}",
        fmt(r.get("Q"), "d") if r.get("Q") is not None else "—",
        fmt(r.get("D"), "d") if r.get("D") is not None else "—",
        fmt(n_total, ","),
        _ms(t),
        fmt(t.get("GBps"), ".0f"),
        fmt(None if frac is None else 100 * frac, ".0f"),
        fmt(t.get("TFLOPs"), ".2f"),
        fmt(None if mmf is None else 100 * mmf, ".1f"),
        _ms(e),
        fmt(r.get("speedup_vs_eager"), ".1f"),
        _ms(k),
        fmt(r.get("speedup_vs_compile"), ".1f"),
        _ms(f),
        fmt(r.get("speedup_vs_fbgemm"), ".1f") if f is not None else "",
        " / ".join([_first(t), _first(k), _first(f) or "·"]),
        f"{_mib(t['peak_extra_bytes'])} / {_mib(e['peak_extra_bytes'])} / {_mib(k['peak_extra_bytes'])}",
        " / ".join(x for x in (_parity(r.get("parity", {"error": "not run"})), _peer_parity(r)) if x),
    ]
    return "| " + " | ".join(cells) + " |"


def _config_line(report: dict[str, Any]) -> str:
    c = report["ceilings"]
    cfg = report["config"]
    line = (
        f"Ceilings (this run): copy {c['copy']['GBps']:.0f} GB/s, bf16 matmul {c['matmul_bf16']['TFLOPs']:.0f} TFLOP/s."
    )
    if "k" in cfg:
        line += f" gsu_topk K = {cfg['k']}."
    if report.get("complete") is False:
        line += f" **Incomplete run**{': ' + report['stopped'] if report.get('stopped') else ''}."
    return line


def _peer_line(report: dict[str, Any]) -> list[str]:
    peer = report.get("peers", {}).get("fbgemm")
    if not peer:
        return []
    if peer["present"]:
        text = f"FBGEMM peer: {peer['source']} ({peer['version'] or 'version unknown'})."
    else:
        text = f"FBGEMM peer absent: {peer['error']}."
    notes = "; ".join(peer.get("notes") or [])
    return [text + (f" ({notes})" if notes and peer["present"] else "")]


def _kernel_lines(stats: list[dict[str, Any]]) -> list[str]:
    if not stats:
        return []
    lines = [
        "",
        "| kernel | constexprs | regs | spills | shared KiB | warps | stages |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        constexprs = ", ".join(f"{k}={v}" for k, v in s["constexprs"].items())
        shared = None if s["shared"] is None else s["shared"] / 1024
        cells = [s["name"], constexprs, fmt(s["n_regs"], "d"), fmt(s["n_spills"], "d"), fmt(shared, ".1f")]
        cells += [fmt(s["num_warps"], "d"), fmt(s["num_stages"], "d")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _goal_lines(goals: list[dict[str, Any]]) -> list[str]:
    lines = ["", "| goal | met | missed | not measured |", "|---|---:|---:|---:|"]
    lines += [f"| {s['goal']} | {s['met']} | {s['missed']} | {s['not_measured']} |" for s in summarize_goals(goals)]
    missed = [g for g in goals if g["met"] is not True]
    if missed:
        lines += [
            "",
            "| goal not met | op | variant | B | dist | L | Q | D | value | |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---|",
        ]
        for g in missed:
            value = "—" if g["value"] is None else f"{g['value']:.2f}"
            met = "NO" if g["met"] is False else f"n/a ({g.get('note', '')})"
            cells = [g["goal"], g["op"], g["variant"], str(g["B"]), str(g["dist"]), f"{g['L']:,}", str(g["Q"])]
            lines.append("| " + " | ".join([*cells, str(g["D"]), value, met]) + " |")
    return lines


def markdown_table(report: dict[str, Any]) -> str:
    """The results, the first calls, the kernels' registers and spills and the goals of a report, as Markdown."""
    lines = [f"# Kernels on {report['gpu']}", "", _config_line(report), *_peer_line(report)]
    if len(report.get("runs", [])) > 1:
        lines.append(
            f"Merged from {len(report['runs'])} runs; each row's % copy and % mm use the ceilings of its own run."
        )
    lines += [
        "",
        "| op | variant | B | lengths | L | Q | D | N | Triton ms | GB/s | % copy | TFLOP/s | % mm | eager ms "
        "| x eager | compile ms | x compile | FBGEMM ms | x FBGEMM | 1st call s Triton / compile / FBGEMM "
        "| peak MiB Triton / eager / compile | parity vs eager (Triton / FBGEMM) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    lines += [_row(r) for r in report["results"]]
    lines += _kernel_lines(report.get("kernel_stats", []))
    lines += _goal_lines(report["goals"])
    return "\n".join(lines)


def merge_previous(path: Path, gpu: str) -> tuple[list[dict], list[dict]]:
    """With --merge: the earlier results in ``path`` (same GPU) and the earlier runs' records; the caller drops
    the rows it measures again (`common.result_key`)."""
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    if old.get("gpu") != gpu:
        raise ValueError(f"{path} holds results of {old.get('gpu')!r}, not of {gpu!r}: not merging")
    return list(old.get("results", [])), list(old.get("runs", []))


def kept_rows(previous: list[dict[str, Any]], measured: set[tuple]) -> list[dict[str, Any]]:
    """The earlier rows this run did not measure again."""
    return [r for r in previous if result_key(r) not in measured]


def gpu_slug(name: str) -> str:
    """The GPU's name as it appears in the results file name (``kernels-<slug>.json``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
