"""Issue 15's goals, evaluated on the result rows (``met`` None: not measurable, with a note saying why):

- target_attention forward at L = 100K, D = 64, B in {16, 64, 256}, uniform and power-law lengths, Q in {1, 16}:
  >= 80% of the copy bandwidth measured in the same run, and >= 3x ``torch.compile`` of the reference;
- gsu_topk at L = 100K, D = 64, B in {16, 64, 256} (every scoring mode, both distributions): >= 60% of the copy
  bandwidth;
- target_attention ahead of FBGEMM's ``jagged_dense_flash_attention`` on every shape measured (forward and
  forward + backward);
- every kernel faster than ``torch.compile`` of its reference on every shape.
"""

from __future__ import annotations

from typing import Any

from .grid import GOAL_BATCH_SIZES, GOAL_DIM, GOAL_LENGTH

TA_BANDWIDTH_FRACTION = 0.80
TA_COMPILE_SPEEDUP = 3.0
GSU_BANDWIDTH_FRACTION = 0.60


def _axis(row: dict[str, Any], name: str) -> Any:
    """B, D, Q or dist of a row; rows of results files from before the grid (B = 256, D = 64, Q = 1, uniform)
    carry them only in ``shapes``."""
    if row.get(name) is not None:
        return row[name]
    shapes = row.get("shapes", {})
    return {
        "B": shapes.get("B"),
        "D": shapes.get("D", shapes.get("Dk")),
        "Q": shapes.get("Q", 1),
        "dist": shapes.get("lengths", "uniform"),
    }[name]


def _at_goal_shape(row: dict[str, Any]) -> bool:
    return row["L"] == GOAL_LENGTH and _axis(row, "D") == GOAL_DIM and _axis(row, "B") in GOAL_BATCH_SIZES


def _goal(goal: str, row: dict[str, Any], value: float | None, met: bool | None, note: str | None) -> dict:
    return {
        "goal": goal,
        "op": row["op"],
        "variant": row["variant"],
        "B": _axis(row, "B"),
        "dist": _axis(row, "dist"),
        "L": row["L"],
        "Q": _axis(row, "Q"),
        "D": _axis(row, "D"),
        "value": value,
        "met": met,
        **({"note": note} if note else {}),
    }


def _why(row: dict[str, Any], *impls: str) -> str | None:
    """The first failure among the implementations a goal needs."""
    for name in impls:
        record = row["impls"].get(name)
        if record is None:
            return f"{name}: not run"
        if record.get("error"):
            return f"{name}: {record['error']}"
    return None


def evaluate_goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every goal on every row it applies to."""
    goals = []
    for r in results:
        tri = r["impls"]["triton"]
        frac = tri.get("bandwidth_fraction")
        ta_forward = r["op"] == "target_attention" and r["variant"] == "forward"
        if _at_goal_shape(r) and (ta_forward or r["op"] == "gsu_topk"):
            target = TA_BANDWIDTH_FRACTION if ta_forward else GSU_BANDWIDTH_FRACTION
            met = None if frac is None else frac >= target
            note = _why(r, "triton") if frac is None else None
            goals.append(_goal(f">= {target:.0%} of the copy bandwidth", r, frac, met, note))
        speedup = r.get("speedup_vs_compile")
        if ta_forward and _at_goal_shape(r):
            met = None if speedup is None else speedup >= TA_COMPILE_SPEEDUP
            note = _why(r, "triton", "compile") if speedup is None else None
            goals.append(_goal(f">= {TA_COMPILE_SPEEDUP:.0f}x torch.compile(reference)", r, speedup, met, note))
        if r["op"] == "target_attention":
            ahead = r.get("speedup_vs_fbgemm")
            met = None if ahead is None else ahead > 1.0
            note = _why(r, "triton", "fbgemm") if ahead is None else None
            goals.append(_goal("ahead of FBGEMM jagged_dense_flash_attention", r, ahead, met, note))
        met = None if speedup is None else speedup > 1.0
        note = _why(r, "triton", "compile") if speedup is None else None
        goals.append(_goal("faster than torch.compile(reference)", r, speedup, met, note))
    return goals


def summarize_goals(goals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per goal: how many rows met it, missed it, could not be measured."""
    summary: dict[str, dict[str, Any]] = {}
    for g in goals:
        entry = summary.setdefault(g["goal"], {"goal": g["goal"], "met": 0, "missed": 0, "not_measured": 0})
        entry[{True: "met", False: "missed", None: "not_measured"}[g["met"]]] += 1
    return list(summary.values())
