"""Cost growth with the history length L: training-step samples/s of our models and of FuxiCTR 2.3.10's at
L in {50, 200, 1,000, 10,000}, measured back to back in one run on the same data, batch size and threads.

    python benchmarks/cost_curve.py --data DATA_DIR [--models din,dien,sim_soft,muse,twin]
        [--lengths 50,200,1000,10000] [--batch-size 256] [--threads 2] [--no-peers] [--results FILE]

For every (L, model): our step alone (`step_profile.profile_model` without the profiler: the trainer's own
`Training` object, sharded tables and fused sparse Adagrad, on batches prefetched from its loader), then, when
FuxiCTR has the model (din -> DIN, dien -> DIEN, sim_soft -> SIM, twin -> TWIN), FuxiCTR's `train_step` on
batches prefetched from its LongCTR loader (`peers_fuxictr.fuxictr_step_rate`, its virtualenv and configs set up
as `peers.py` does: the same embedding size, towers, batch size and learning rate; DIEN post-padded, defect (c)).
Each side reads the last L behaviors strictly before the sample: L is DIN/DIEN's ``seq_len`` and the two-stage
models' ``max_len`` (their short window is min(short_len, L)). Both sides run on the same batch size: our
``data.max_batch_behaviors`` is raised to batch x (2L + short window) so that the behavior cap does not shrink our
batches at long L (FuxiCTR has none).

What it measures is the step, not the loader or the epoch (`peers.py` has the end-to-end rows): samples/s =
samples of the timed steps / their wall time, after `--warmup` steps. Steps per point default to a schedule
that keeps each point to seconds at short L and to a few steps at 10K (`--steps` fixes it). The JSON keeps every
point with the behaviors each sample actually read (the demo world's histories are shorter than 10K for most
samples: the cap is L, the mean is what the step pays for). Figures of one run compare with each other only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), str(HERE)] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]

PEERS = {"din": "DIN", "dien": "DIEN", "sim_soft": "SIM", "twin": "TWIN"}
STEPS = {50: 30, 200: 20, 1000: 10, 10000: 4}  # timed steps per point by L (the nearest key below)


def steps_for(length: int, fixed: int | None) -> int:
    if fixed is not None:
        return fixed
    return STEPS[max([k for k in STEPS if k <= length] or [min(STEPS)])]


def our_point(model: str, data: Path, length: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import peers
    from step_profile import profile_model

    defaults = peers.our_config(model, [])
    ns = argparse.Namespace(max_len=length, batch_size=args.batch_size, epochs=1)
    sets = [s for s in peers.our_overrides(model, defaults, ns) if not s.startswith("train.epochs")]
    sets += ["data.num_workers=1"]  # our_overrides raises the behavior cap where the window needs it
    steps = steps_for(length, args.steps)
    return profile_model(model, data, sets, steps, args.warmup, work / "ours", profile_steps=False)


def peer_point(model: str, length: int, args: argparse.Namespace, work: Path, py: Path) -> dict[str, Any]:
    import peers
    import yaml
    from _common import run_measured

    peer = PEERS[model]
    ns = argparse.Namespace(max_len=length, batch_size=args.batch_size, epochs=1)
    cfg = peers.our_config(model, peers.our_overrides(model, peers.our_config(model, []), ns))
    expid = f"{peer}_L{length}"
    params = peers.fuxictr_params(peer, cfg, ns)
    config = work / "config"
    model_cfg = yaml.safe_load((config / "model_config.yaml").read_text())  # main() wrote its Base section
    model_cfg[expid] = params
    (config / "model_config.yaml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    out = work / "runs" / f"fuxictr-{expid}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    variant = "post-padded" if peer == "DIEN" else "as shipped"
    spec = {"mode": "steps", "config_dir": str(config), "expid": expid, "variant": variant, "threads": args.threads,
            "out": str(out), "steps": steps_for(length, args.steps), "warmup": args.warmup}  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [str(py), str(HERE / "peers_fuxictr.py"), str(out / "spec.json")]
    measured = run_measured(cmd, work / "logs" / f"fuxictr-{expid}-steps.log", cwd=work,
                            env=peers.thread_env(args.threads))  # fmt: skip
    res = json.loads((out / "result.json").read_text())
    res["peak_pss_bytes"] = measured["peak_pss_bytes"]
    return res


def table(points: list[dict[str, Any]], lengths: list[int]) -> str:
    models = list(dict.fromkeys(p["model"] for p in points))
    head = ["model", *(f"L={n:,}" for n in lengths), "slowdown from the shortest L to the longest measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side in ("ours", "fuxictr"):
        for m in models:
            cells, rates, measured = [], [], []
            for n in lengths:
                p = next((x for x in points if x["model"] == m and x["length"] == n), None)
                r = (p or {}).get(side) or {}
                if not r:
                    cells.append("-")
                elif "error" in r:
                    cells.append("error")
                else:
                    cells.append(f"{r['samples_per_s']:,.0f}")
                    rates.append(r["samples_per_s"])
                    measured.append(n)
            if all(c == "-" for c in cells):
                continue
            growth = "-"
            if len(rates) > 1 and rates[-1]:
                growth = f"{rates[0] / rates[-1]:.1f}x ({measured[0]:,} -> {measured[-1]:,})"
            name = m if side == "ours" else f"FuxiCTR {PEERS[m]}"
            lines.append("| " + " | ".join([name, *cells, growth]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a dataset directory built by `ctr build`")
    parser.add_argument("--models", default="din,dien,sim_soft,muse,twin")
    parser.add_argument("--lengths", default="50,200,1000,10000")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point (default: by L)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true", help="ours only (no FuxiCTR virtualenv)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifelong-ctr-cost-curve"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "cost-curve.json")
    args = parser.parse_args()
    if not (args.data / "manifest.json").exists():
        parser.error(f"--data {args.data}: no manifest.json (build it with `ctr build`)")
    import peers
    import torch
    from _common import JobError, machine_info
    from peers_convert import convert_dataset

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lengths = [int(x) for x in args.lengths.split(",")]
    work = args.work.resolve()
    for sub in ("logs", "runs", "config"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    py = None
    if not args.no_peers and any(m in PEERS for m in models):
        py = peers.ensure_fuxictr_venv(work)
        conv = convert_dataset(args.data, work / "data" / peers.DATASET_ID)
        import yaml

        # one loader worker, as before: the curve times FuxiCTR's steps on batches prefetched from its loader
        (work / "config" / "model_config.yaml").write_text(
            yaml.safe_dump({"Base": peers.base_config(work, peers.our_config(models[0], []), 1)}, sort_keys=False)
        )
        (work / "config" / "dataset_config.yaml").write_text(
            yaml.safe_dump(peers.dataset_config(conv, work / "data"), sort_keys=False)
        )
    manifest = json.loads((args.data / "manifest.json").read_text())
    points: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    def save() -> None:
        result.update({
            "machine": machine_info(),
            "dataset": str(args.data.resolve()),
            "hist_len": manifest.get("hist_len"),
            "settings": {"batch_size": args.batch_size, "threads": args.threads, "warmup": args.warmup,
                         "steps": {str(n): steps_for(n, args.steps) for n in lengths}},
            "what": "training-step samples/s on prefetched batches (see the module docstring); ours: sharded "
                    "tables + fused sparse Adagrad; FuxiCTR: its train_step (Adam); DIEN: FuxiCTR post-padded",
            "points": points,
        })  # fmt: skip
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2, default=float) + "\n")

    for length in lengths:
        for model in models:
            point: dict[str, Any] = {"model": model, "length": length}
            print(f"[ours] {model} L={length}", flush=True)
            try:
                point["ours"] = our_point(model, args.data.resolve(), length, args, work)
            except Exception as e:  # one point's failure (memory at 10K, say) is recorded, the others still run
                point["ours"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if py is not None and model in PEERS:
                print(f"[fuxictr] {PEERS[model]} L={length}", flush=True)
                try:
                    point["fuxictr"] = peer_point(model, length, args, work, py)
                except (JobError, FileNotFoundError, OSError) as e:
                    point["fuxictr"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            ours, fx = point.get("ours", {}), point.get("fuxictr") or {}
            if ours.get("samples_per_s") and fx.get("samples_per_s"):
                point["ratio"] = ours["samples_per_s"] / fx["samples_per_s"]
            points.append(point)
            save()
    print(table(points, lengths))
    print(f"wrote {args.results}")
    return 0 if all("error" not in (p.get("ours") or {}) for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
