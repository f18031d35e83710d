"""`benchmarks/peers_summary.py`: every row of a side-by-side run held against the target, the verdicts read from
the paired intervals, and the command's table, JSON and chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers_summary import main, markdown, parse_source, quality_verdict, summarize  # noqa: E402


def _delta(delta: float, lo: float, hi: float) -> dict[str, float | bool]:
    return {"delta": delta, "lo": lo, "hi": hi, "significant": lo > 0 or hi < 0}


def _row(model: str, ours: float, fx: float, auc: tuple[float, float, float] | None, ours_as: str = "defaults"):
    q = {"paired": False, "why": "differ"} if auc is None else {"paired": True, "auc": _delta(*auc),
                                                                "gauc": _delta(*auc)}  # fmt: skip
    return {
        "model": model, "variant": "as shipped", "ours_variant": ours_as,
        "ours": {"samples_per_s": ours, "metrics": {"auc": 0.7}},
        "fuxictr": {"samples_per_s": fx, "metrics": {"auc": 0.69}},
        "quality_delta": q,
    }  # fmt: skip


RESULT = {
    "settings": {"max_len": 50},
    "results": [
        _row("din", 3000.0, 1000.0, (0.01, 0.002, 0.02)),  # 3x, ahead
        _row("dien", 2500.0, 1000.0, (-0.05, -0.09, -0.01)),  # 2.5x, behind
        _row("sdim", 1900.0, 1000.0, (0.01, -0.004, 0.02)),  # 1.9x, level
        _row("twin", 2000.0, 1000.0, (-0.002, -0.01, 0.006), "FuxiCTR's architecture"),  # exactly 2x, level
        _row("eta", 4000.0, 1000.0, None),  # unpaired
    ],
}


def test_quality_verdict_reads_the_interval():
    assert quality_verdict({"paired": True, "auc": _delta(0.01, 0.001, 0.02)}, "auc") == "ahead"
    assert quality_verdict({"paired": True, "auc": _delta(-0.01, -0.02, -0.001)}, "auc") == "behind"
    assert quality_verdict({"paired": True, "auc": _delta(0.0, -0.01, 0.01)}, "auc") == "level"
    assert quality_verdict({"paired": True, "auc": _delta(0.0, 0.0, 0.01)}, "auc") == "level"  # 0 held at the edge
    assert quality_verdict({"paired": False}, "auc") == "unpaired"
    assert quality_verdict(None, "auc") == "unpaired"


def test_rows_against_the_target():
    rows = summarize("ml", RESULT)
    by = {r["model"]: r for r in rows}
    assert [r["model"] for r in rows] == ["din", "dien", "sdim", "twin", "eta"]  # the run's order
    assert by["din"]["ratio"] == pytest.approx(3.0) and by["din"]["meets"]
    assert by["dien"]["speed"] == "met" and by["dien"]["auc"] == "behind" and not by["dien"]["meets"]
    assert by["sdim"]["speed"] == "not met" and by["sdim"]["auc"] == "level" and not by["sdim"]["meets"]
    assert by["twin"]["meets"]  # 2.00x meets a 2x target; a level AUC is not worse
    assert by["eta"]["auc"] == "unpaired" and not by["eta"]["meets"]  # no interval: no quality claim
    assert all(r["dataset"] == "ml" and r["max_len"] == 50 for r in rows)
    assert not summarize("ml", RESULT, target=1.5)[1]["meets"]  # behind stays behind at any speed
    assert summarize("ml", RESULT, target=1.5)[2]["meets"]


def test_markdown_says_why_a_row_misses():
    text = markdown(summarize("ml", RESULT))
    lines = text.splitlines()
    assert lines[0].startswith("| data | model |") and len([x for x in lines if x.startswith("| ml |")]) == 5
    assert "| no: AUC behind |" in text and "| no: 1.90x |" in text and "| no: AUC unpaired |" in text
    assert "+0.0100 [+0.0020, +0.0200] ahead" in text
    assert text.endswith("2 of 5 rows meet the target.")
    assert lines[2].endswith("| yes | - |")  # no source given: no run named
    assert markdown(summarize("ml", RESULT, source="/x/peers-ml-1.json")).splitlines()[2].endswith("| peers-ml-1 |")


def test_command_writes_table_json_and_chart(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "peers-demo.json"
    a.write_text(json.dumps(RESULT))
    b.write_text(json.dumps({"settings": {"max_len": 1000}, "results": RESULT["results"][:2]}))
    out, png = tmp_path / "s" / "summary.json", tmp_path / "s" / "summary.png"
    assert main([f"movielens={a}", str(b), "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "3 of 7 rows meet the target." in printed and "| peers-demo | dien |" in printed
    assert "| yes | a |" in printed  # each row names its run
    summary = json.loads(out.read_text())
    assert summary["target"] == 2.0 and len(summary["rows"]) == 7
    assert summary["rows"][0]["source"] == str(a) and summary["rows"][5]["max_len"] == 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_labels_may_hold_equals(tmp_path):
    f = tmp_path / "r.json"
    f.write_text("{}")
    assert parse_source(f"demo L=50={f}") == ("demo L=50", f)
    assert parse_source(f"ml={f}") == ("ml", f)
    assert parse_source(str(f)) == ("r", f)
    assert parse_source("x=missing.json") == ("x=missing", Path("x=missing.json"))  # no file: named as given


def test_command_refuses_what_is_not_a_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        main([str(bad)])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json")])
