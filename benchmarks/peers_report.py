"""benchmarks/peers.py's report: the FuxiCTR 2.3.10 defects each row ran into, and the side-by-side table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

RESAMPLES = 200  # paired bootstrap resamples of the test users (ctr.evaluation.metrics.paired_bootstrap)


def paired_quality(ours_predictions: Path, fuxictr_predictions: Path, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Ours minus FuxiCTR in test AUC and GAUC with a paired bootstrap over the test users (95% interval).

    Both sides score the same test split in its stored order (peers_convert writes it row for row; neither tool
    shuffles at test time); that is checked: the labels and the users must agree row by row, else the result says
    why it is not paired instead of pairing rows that are not the same samples."""
    from ctr.evaluation.metrics import paired_bootstrap

    ours = pq.read_table(ours_predictions, columns=["user_idx", "label", "score"])
    fx = pq.read_table(fuxictr_predictions, columns=["user_index", "label", "score"])
    if ours.num_rows != fx.num_rows:
        return {"paired": False, "why": f"{ours.num_rows} test rows (ours) against {fx.num_rows} (FuxiCTR)"}
    users, labels = ours["user_idx"].to_numpy(), ours["label"].to_numpy()
    for name, a, b in (("users", users, fx["user_index"].to_numpy()), ("labels", labels, fx["label"].to_numpy())):
        differ = a.astype(np.int64) != b.astype(np.int64)
        if differ.any():
            bad = int(np.flatnonzero(differ)[0])
            return {"paired": False, "why": f"the two prediction sets' {name} differ first at test row {bad}"}
    out: dict[str, Any] = {"paired": True, "resamples": resamples, "groups": "user"}
    for metric in ("auc", "gauc"):
        d = paired_bootstrap(
            labels, ours["score"].to_numpy(), fx["score"].to_numpy(), users, metric=metric, resamples=resamples
        )
        out[metric] = {"delta": d.delta, "lo": d.lo, "hi": d.hi, "significant": d.significant}
    return out


def delta_text(q: dict[str, Any] | None, metric: str = "auc") -> str:
    """``+0.0123 [+0.0050, +0.0190]`` (ours − FuxiCTR and its 95% interval), or why there is none."""
    if not q:
        return "-"
    if not q.get("paired"):
        return "not paired"
    d = q[metric]
    return f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def defects_report(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each defect claim with what the source says (file:line) and what the runs measured."""
    fx = [r["fuxictr"] for r in rows if isinstance(r.get("fuxictr"), dict) and "probes" in r["fuxictr"]]
    if not fx:
        return {}
    probes = [f["probes"] for f in fx]
    src = probes[0]["sources"]

    def found(key: str) -> bool:
        return all(not s.startswith("NOT FOUND") for s in src[key])

    rep: dict[str, dict[str, Any]] = {}
    a = probes[0]["a"]
    rep["a"] = {
        "claim": "the LongCTR run script asserts another fuxictr version",
        "confirmed": bool(a["fails"]) and found("a"),
        "measured": f"run_expid.py imports fuxictr_version.py, which asserts {a['run_script_asserts']}; "
        f"installed {a['installed']}",
        "workaround": "FuxiCTR's classes called directly (FeatureProcessor, build_dataset, FeatureMap, RankDataLoader "
        "with LongCTRDataLoader, the model's fit/predict)",
        "source": src["a"],
    }
    b = {f["model"]: f["probes"].get("b") for f in fx if "b" in f["probes"]}
    rep["b"] = {
        "claim": "SIM/ETA/SDIM/TWIN crash on a batch whose longest history is shorter than short_seq_len",
        "confirmed": any(v and v.get("crashes") for v in b.values()) if b else None,
        "measured": b or "no window model was run",
        "workaround": "such batches are padded to short_seq_len (the collator's padding_seqs replaced per loader)",
        "source": src["b"],
    }
    dien = {f["variant"]: f for f in fx if f["model"] == "DIEN"}
    c: dict[str, Any] = {v: {"probe": f["probes"].get("c"), "auc_ours_fn": f["metrics"]["auc"],
                             "gauc_ours_fn": f["metrics"]["gauc"]} for v, f in dien.items()}  # fmt: skip
    shorter = [(v["probe"] or {}).get("test_rows_shorter_than_batch", 0) for v in c.values()]
    rep["c"] = {
        "claim": "DIEN packs the first seq_len positions while the collator pre-pads: its GRUs read padding",
        "confirmed": found("c") and any(n > 0 for n in shorter) if c else None,
        "measured": c or "dien was not run",
        "workaround": "measured both as shipped (pre-padded) and post-padded (the last max_len behaviors, padded at "
        "the end; FuxiCTR's own padding='post' would also truncate at the end and keep the oldest)",
        "source": src["c"],
    }  # fmt: skip
    d = next((f["probes"].get("d") for f in fx if f["model"] == "SIM"), None)
    rep["d"] = {
        "claim": "SIM's top-k can pick padding (score 0) over negative-scored real behaviors",
        "confirmed": found("d"),
        "measured": d or "sim_soft was not run",
        "note": "possible only when a row has more real behaviors than topk (max_len > topk); at max_len <= topk "
        "every behavior is selected and the count is 0",
        "workaround": "none (reported, not changed)",
        "source": src["d"],
    }
    e = probes[0]["e"]
    rep["e"] = {
        "claim": "the gAUC process pool fails on one core",
        "confirmed": bool(e.get("fails_on_one_core")) and found("e"),
        "measured": e,
        "workaround": "fuxictr.metrics.mp replaced by an in-process pool (the same per-user gAUC, serially)",
        "source": src["e"],
    }
    rep["f"] = {
        "claim": "(found while checking (b)) the short window's mask is one position off its embeddings: embeddings "
        "[:, -S:-1] of L+1 positions (target last) meet mask [:, -S:-1] of L positions, so the window covers S-1 "
        "behaviors and its oldest one carries its predecessor's mask (a lone behavior is masked out)",
        "confirmed": found("f"),
        "workaround": "none (reported, not changed)",
        "source": src["f"],
    }
    return rep


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | ours as | FuxiCTR | ours AUC / GAUC / logloss | FuxiCTR AUC / GAUC / logloss | FuxiCTR's own gAUC "
        "| ours − FuxiCTR AUC [95%] | ours − FuxiCTR GAUC [95%] | ours samples/s | FuxiCTR samples/s | ratio |",
        "|---|---|---|---|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ours, fx = r.get("ours") or {}, r.get("fuxictr") or {}
        om, fm = ours.get("metrics") or {}, fx.get("metrics") or {}
        o = " / ".join(_fmt(om.get(k)) for k in ("auc", "gauc", "logloss")) if om else ours.get("error", "failed")
        f = " / ".join(_fmt(fm.get(k)) for k in ("auc", "gauc", "logloss")) if fm else fx.get("error", "failed")
        own = (fx.get("fuxictr_own_metrics") or {}).get("gAUC")
        osps, fsps = ours.get("samples_per_s"), fx.get("samples_per_s")
        lr = f", lr {fx['learning_rate']:g}" if "learning_rate" in fx else ""
        slr = f", tables' {ours['sparse']}" if ours.get("sparse") is not None else ""
        slr += f", dense lr {ours['dense_lr']:g}" if ours.get("dense_lr") is not None else ""
        slr += f", tables' lr {ours['sparse_lr']:g}" if ours.get("sparse_lr") is not None else ""
        ratio = f"{osps / fsps:.2f}" if osps and fsps else "-"
        lines.append(
            f"| {r['model']} | {r.get('ours_variant', 'defaults')}{slr} | {r['peer']} ({r['variant']}{lr}) | "
            f"{o} | {f} | "
            f"{_fmt(own)} | {delta_text(r.get('quality_delta'))} | {delta_text(r.get('quality_delta'), 'gauc')} | "
            f"{f'{osps:,.0f}' if osps else '-'} | {f'{fsps:,.0f}' if fsps else '-'} | {ratio} |"
        )
    return "\n".join(lines)
