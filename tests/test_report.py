"""Report rendering: self-contained HTML with every figure, Markdown tables, PNGs, combined metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ctr.evaluation import GAUC_DEFINITION, evaluate_predictions
from ctr.report import FIGURE_IDS, render_report


def _make_run(
    root: Path,
    name: str,
    model: str,
    noise: float,
    seed: int,
    run_name: str | None = None,
    with_preds: bool = True,
    with_log: bool = True,
) -> Path:
    """A fake run directory: config, predictions with p_true on a shared synthetic split, metrics, train log."""
    run = root / name
    run.mkdir(parents=True)
    config = {"model": {"name": model, "embed_dim": 16}, "dataset_dir": str(root / "dataset")}
    if run_name:
        config["run_name"] = run_name
    (run / "config.json").write_text(json.dumps(config))

    rng = np.random.default_rng(0)  # same split for every run: the oracle is shared
    n = 2_000
    users = rng.integers(2, 200, n).astype(np.int32)
    hist_len = np.minimum(rng.lognormal(5, 2, n), 150_000).astype(np.int32)
    logit_true = rng.normal(-2.0, 1.2, n)
    p_true = 1 / (1 + np.exp(-logit_true))
    label = (rng.random(n) < p_true).astype(np.int8)
    model_rng = np.random.default_rng(seed)
    score = 1 / (1 + np.exp(-(logit_true + model_rng.normal(0, noise, n))))
    preds = pl.DataFrame(
        {
            "user_idx": users,
            "item_idx": rng.integers(2, 500, n).astype(np.int32),
            "ts": np.arange(n, dtype=np.int64),
            "label": label,
            "score": score.astype(np.float32),
            "hist_len": hist_len,
            "p_true": p_true,
        }
    )
    preds.write_parquet(run / "predictions.parquet")
    evaluate_predictions(run / "predictions.parquet", run / "metrics.json", split="test")
    if not with_preds:
        (run / "predictions.parquet").unlink()

    if with_log:
        lines = []
        for step in range(0, 400, 5):
            lines.append(
                {
                    "kind": "train",
                    "step": step,
                    "epoch": step // 200,
                    "loss": 0.5 * np.exp(-step / 150) + 0.35 + 0.02 * model_rng.random(),
                    "samples_per_s": 1e4,
                }
            )
            if step % 100 == 0:
                lines.append(
                    {
                        "kind": "eval",
                        "step": step,
                        "epoch": step // 200,
                        "auc": 0.7,
                        "logloss": 0.4,
                        "gauc": 0.6 + step / 4000 - noise / 20,
                    }
                )
        (run / "train_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = [
        _make_run(root, "din-1", "din", noise=1.0, seed=1),
        _make_run(root, "sim-1", "sim", noise=0.5, seed=2, run_name="SIM soft"),
    ]
    out = root / "report"
    return runs, out, render_report(runs, out)


def test_report_files_figures_and_offline(report):
    runs, out, paths = report
    for key in ("html", "markdown", "metrics", *FIGURE_IDS):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    for fig_id in FIGURE_IDS:
        assert (out / f"{fig_id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = paths["html"].read_text()
    for fig_id in FIGURE_IDS:
        m = re.search(rf'<figure id="{fig_id}">(.*?)</figure>', doc, re.S)
        assert m, fig_id
        assert '<img alt="' in m.group(1) and 'src="data:image/png;base64,' in m.group(1)
        assert "<figcaption>" in m.group(1)
    # offline: nothing fetched from the network, no scripts, no external style sheets or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", doc, re.I)
    assert "<script" not in doc.lower() and "@import" not in doc and "<link" not in doc.lower()
    assert GAUC_DEFINITION in doc.replace("&#x27;", "'").replace("&quot;", '"')
    for run in runs:
        assert str(run.resolve()) in doc
    assert "oracle (true p)" in doc and "test" in doc

    md = paths["markdown"].read_text()
    assert GAUC_DEFINITION in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| din |") for line in rows)
    assert any(line.startswith("| SIM soft |") for line in rows)
    for fig_id in FIGURE_IDS:
        assert f"]({fig_id}.png)" in md

    combined = json.loads(paths["metrics"].read_text())
    assert set(combined) == {"din", "SIM soft"}
    assert combined["SIM soft"]["gauc"] > combined["din"]["gauc"]  # less noise, better ranking
    assert combined["din"]["oracle"] == combined["SIM soft"]["oracle"]


def test_report_missing_files_and_duplicate_names(tmp_path):
    a = _make_run(tmp_path, "a", "din", noise=1.0, seed=1, with_preds=False, with_log=False)
    b = _make_run(tmp_path, "b", "din", noise=0.8, seed=3, with_log=False)
    paths = render_report([a, b], tmp_path / "out")
    doc = paths["html"].read_text()
    assert "din (a)" in doc and "din (b)" in doc
    assert "predictions.parquet missing" in doc and "train_log.jsonl missing" in doc
    # ROC still drawn for b; no run has a training log, so that figure states it instead of an image
    assert re.search(r'<figure id="fig-roc"><img', doc)
    m = re.search(r'<figure id="fig-training-curves">(.*?)</figure>', doc, re.S)
    assert m and "<img" not in m.group(1) and "cannot be drawn" in m.group(1)
    assert "fig-training-curves" not in paths
    assert set(json.loads(paths["metrics"].read_text())) == {"din (a)", "din (b)"}


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def test_report_renders_in_headless_browser(report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / google-chrome on PATH")
    _, _, paths = report
    url = paths["html"].resolve().as_uri()
    common = [
        browser,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True).stdout
    for fig_id in FIGURE_IDS:
        assert re.search(rf'<figure id="{fig_id}"><img[^>]*src="data:image/png;base64,', dom), fig_id
    assert "GAUC definition" in dom and "SIM soft" in dom


def test_lain_variants_share_their_backbones_colour(tmp_path):
    from ctr.report.loading import RunData
    from ctr.report.loading import disambiguate as _disambiguate

    def run(name: str, label: str | None = None) -> RunData:
        return RunData(tmp_path / (label or name), label or name, {"model": {"name": name}}, None, None, None)

    runs = [run("din"), run("din_lain"), run("muse_lain"), run("sim_hard"), run("sim_hard", "sim_hard (seed 1)")]
    _disambiguate(runs)
    din, din_lain, muse_lain, sim_a, sim_b = runs
    assert din_lain.color == din.color and din_lain.variant and din_lain.linestyle == "--" and din_lain.hatch
    assert not din.variant and din.linestyle == "-" and din.hatch is None
    assert not muse_lain.variant  # its backbone is not in the report: a colour and a style of its own
    assert len({din.color, muse_lain.color, sim_a.color, sim_b.color}) == 4  # two runs of one model stay apart
