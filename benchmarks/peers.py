"""Side by side with FuxiCTR 2.3.10: the same models on the same data, budget and threads; test AUC / GAUC /
logloss and training samples/s of this project and of FuxiCTR's LongCTR model zoo.

Models both have (ours -> FuxiCTR): din -> DIN, dien -> DIEN, sim_soft -> SIM, eta -> ETA, sdim -> SDIM,
twin -> TWIN. For each one:

1. FuxiCTR 2.3.10 runs in its own virtualenv, WORK/venv (`python -m venv`, torch pinned to 2.13.0, the CPU build;
   reused when it is there). Its other requirements (pandas, pyyaml, scikit-learn, numpy, h5py, tqdm, pyarrow,
   polars, ray[data], pydantic: its wheel metadata) pull no CUDA; ray is needed because `fuxictr.preprocess` and
   `fuxictr.pytorch.dataloaders` import it at module level.
2. The dataset is converted to FuxiCTR's LongCTR input, WORK/data/peers/: `user_info.parquet` (row u = user u's
   whole behavior sequence, `full_item_seq`, item indices), `item_info.parquet` (row i = item i: item_id, cate_id;
   row 0 is padding, since the collator looks rows up by position) and `{train,valid,test}.parquet` (user_index,
   item_index, seq_len = our hist_len, the context columns, label). FuxiCTR's collator then feeds
   `full_item_seq[:seq_len][-max_len:]`: the same last max_len behaviors strictly before the sample as our loader.
3. Configs: ours is `ctr train --print-config` with --max-len / --batch-size / --epochs set; FuxiCTR's
   dataset_config.yaml and model_config.yaml (WORK/config/) take the embedding size, tower, attention sizes,
   max_len, batch size, learning rate, epochs, early-stopping patience (on validation GAUC) and seed from ours.
4. Each side trains in its own subprocess with OMP_NUM_THREADS = --threads and the same number of loader worker
   processes (--workers; by default our rule, `features.loader.loader_workers`: none on a 2-core machine, the
   batches assembled in the training process, for FuxiCTR's DataLoader too): ours with
   `ctr train` + `ctr evaluate`, FuxiCTR with its classes called from `peers_fuxictr.py` (SPEC, run by
   WORK/venv/bin/python: its LongCTR `run_expid.py` cannot be used, see (a)), which writes its test predictions
   (user_index, label, score) and its training samples/s.
5. Both prediction sets are scored by `ctr.evaluation.metrics` (auc; gauc = per-user AUC weighted by the user's
   impressions over users with both classes; logloss), so the definitions match. FuxiCTR's own gAUC
   (`fuxictr.metrics`, the same definition) is shown beside it: the two should agree to rounding.

    python benchmarks/peers.py --data DATA_DIR [--models din,dien,sim_soft,eta,sdim,twin] [--max-len 50]
        [--epochs N] [--batch-size 1024] [--threads 2] [--seed N] [--ours-ranks 2] [--ours-compile]
        [--fuxictr-lr 0.001,0.01,0.03] [--ours-sparse-lr 0.05,0.2] [--work DIR] [--results FILE]

How to read it: samples/s is each side's median over its training logging windows after the first (the first
carries start-up; validation time is not counted), ratio = ours / FuxiCTR (> 1: ours trains faster). Quality is one
run per side and seed; "ours − FuxiCTR" is the test AUC / GAUC difference with its 95% interval from a paired
bootstrap over the test users (both tools score the same test rows in the same order, which is checked), so an
interval that holds 0 is a tie. FuxiCTR's one Adam trains its tables at the learning rate it is given: ours' dense
rate (1e-3) unless --fuxictr-lr lists others, each trained, the row keeping the best validation gAUC (at 1e-3 its
tables learn far slower than ours, Adagrad at optim.sparse_lr 0.05: on the demo world its one-epoch AUC was 0.69 (DIN)
and 0.52 (SIM) at 1e-3 against 0.81 at 1e-2). Not the same on both sides, by design or because one side has no
such option (the JSON's "differences"): our tables train with Adagrad (optim.sparse_lr; --ours-sparse adagrad,adam
also searches FBGEMM's Adam on validation), FuxiCTR's with its one Adam; our DIEN adds its auxiliary loss;
our two-stage models use DIN-style short-term attention and their own GSU/ESU details (TWIN's cross features, SDIM's
hash attention) where FuxiCTR uses multi-head target attention.

Defects of FuxiCTR 2.3.10 the runner works around and reports (each found in its source, with file:line taken from
the installed package at run time, and probed live where it can be; JSON "fuxictr_defects", printed under the table):

(a) `model_zoo/LongCTR/run_expid.py` imports `fuxictr_version.py`, which asserts fuxictr == 2.3.2: the shipped run
    script fails under 2.3.10. Worked around by calling the classes directly.
(b) SIM/ETA/SDIM/TWIN slice the embeddings `[:, -short_seq_len:-1]` (target included: L + 1 positions) and the
    mask `[:, -short_seq_len:-1]` (L positions); when a batch's padded length L (its longest history, capped at
    max_len) is below short_seq_len the two slices differ in length and the attention crashes. Worked around by
    padding such batches to short_seq_len. The same two slices are also one position apart when they do not
    crash: the short window's oldest behavior carries its predecessor's mask (reported as (f)).
(c) DIEN packs the first `seq_len` positions of each row (`pack_padded_sequence`) while the collator pads at the
    front ("pre"): as shipped, its GRUs read padding and miss the most recent behaviors of every row shorter than
    its batch. Measured both ways: "as shipped" and "post-padded" (the collator pads at the end, still keeping the
    last max_len behaviors: its own padding="post" would also truncate at the end, keeping the oldest).
(d) SIM's soft search scores `qk * mask`: padding scores 0, so its top-k picks padding over real behaviors whose
    score is negative whenever a row has more real behaviors than fit (L > topk). Not changed; the runner counts
    the test samples where it happens.
(e) `fuxictr.metrics.evaluate_metrics` computes gAUC in `mp.Pool(processes=mp.cpu_count() // 2)`: on one core
    that is Pool(0), a ValueError. Worked around with an in-process pool (the same per-user function, serially).
Results go to --results (default benchmarks/results/peers.json); run directories, logs, configs, data: --work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # run as a script or imported as benchmarks.peers: the sibling modules either way
    sys.path.insert(0, str(HERE))

from peers_arch import (  # noqa: E402
    ARCH_PEERS,
    OURS_COMPILED,
    OURS_DEFAULTS,
    OURS_PEER_ARCH,
    architecture_sets,
    has_din_unit,
)
from peers_config import (  # noqa: E402, F401 - re-exported: cost_curve.py and the tests call them as peers.*
    ACTIVATIONS,
    DATASET_ID,
    SEARCH_TAGS,
    SPARSE_OPTIMIZERS,
    _ctr,
    base_config,
    dataset_config,
    fuxictr_params,
    our_config,
    our_overrides,
    search_grid,
    sparse_search,
)
from peers_convert import convert_dataset  # noqa: E402
from peers_report import RESAMPLES, defects_report, paired_quality, table  # noqa: E402

FUXICTR_VERSION = "2.3.10"
TORCH_PIN = "torch==2.13.0"  # the CPU build on local disk; an open range would pull a multi-GB CUDA build
PEERS = {"din": "DIN", "dien": "DIEN", "sim_soft": "SIM", "eta": "ETA", "sdim": "SDIM", "twin": "TWIN"}
WINDOW_MODELS = ("SIM", "ETA", "SDIM", "TWIN")  # the ones with a short window, defect (b)


# ---- running both sides --------------------------------------------------------------------------------------
def ranks_variant(args: argparse.Namespace) -> str:
    """The name of the --ours-ranks rows: our defaults trained by that many processes sharing the threads."""
    per = max(1, args.threads // args.ours_ranks)
    return f"defaults, {args.ours_ranks} ranks x {per} thread{'s' if per > 1 else ''}"


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    return env


def ensure_fuxictr_venv(work: Path) -> Path:
    """WORK/venv with fuxictr 2.3.10 and torch 2.13.0 (CPU), created on first use and reused after; its python."""
    venv = work / "venv"
    py = venv / "bin" / "python"
    probe = "import fuxictr, torch; print(fuxictr.__version__, torch.__version__)"

    def versions() -> list[str] | None:
        if not py.exists():
            return None
        r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        return r.stdout.split() if r.returncode == 0 else None

    have = versions()
    if have is None:
        print(f"creating {venv} (fuxictr {FUXICTR_VERSION}, {TORCH_PIN})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # one resolver run with both pins: nothing fuxictr needs may move torch off the CPU build
        subprocess.run(
            [str(py), "-m", "pip", "install", "--quiet", TORCH_PIN, f"fuxictr=={FUXICTR_VERSION}"], check=True
        )
        have = versions()
    if not have or have[0] != FUXICTR_VERSION or not have[1].startswith(TORCH_PIN.split("==")[1]):
        raise SystemExit(
            f"{venv}: has fuxictr/torch {have}, want {FUXICTR_VERSION} / {TORCH_PIN}; remove it to rebuild"
        )
    return py


def _windows_median(rates: list[float]) -> float | None:
    rates = rates[1:] if len(rates) > 1 else rates  # the first window carries start-up
    return round(statistics.median(rates), 1) if rates else None


def score(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> dict[str, Any]:
    """Our metrics (ctr.evaluation.metrics) on one prediction set."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from ctr.evaluation.metrics import auc, gauc, logloss

    g = gauc(labels, scores, users)
    return {
        "auc": auc(labels, scores),
        "gauc": g.value,
        "logloss": logloss(labels, scores),
        "gauc_users_used": g.users_used,
        "gauc_users_skipped": g.users_skipped,
        "samples": int(labels.size),
    }


def run_ours(
    model: str,
    sets: list[str],
    args: argparse.Namespace,
    work: Path,
    log_every: int,
    run_name: str | None = None,
    nproc: int = 1,
) -> dict[str, Any]:
    """`ctr train` + `ctr evaluate` of one of our variants; ``nproc`` ranks share --threads (each rank's batch is
    its share of --batch-size, so the global batch is the same)."""
    from _common import run_measured

    name = run_name or model
    run = work / "runs" / f"ours-{name}"
    shutil.rmtree(run, ignore_errors=True)
    env = thread_env(max(1, args.threads // nproc))
    sets = [*sets, f"train.log_every={log_every}"]
    cmd = [_ctr(), "-q", "train", "--data", str(args.data), "--model", model, "--out", str(run), "--nproc", str(nproc)]
    cmd += [x for s in sets for x in ("--set", s)]
    train = run_measured(cmd, work / "logs" / f"ours-{name}-train.log", env=env)
    ev = run_measured([_ctr(), "-q", "evaluate", "--run", str(run)], work / "logs" / f"ours-{name}-eval.log", env=env)
    recs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if r["kind"] == "train"]
    preds = pq.read_table(run / "predictions.parquet", columns=["user_idx", "label", "score"])
    summary = json.loads((run / "train_summary.json").read_text())
    return {
        "run": str(run),
        "overrides": sets,
        "metrics": score(preds["label"].to_numpy(), preds["score"].to_numpy(), preds["user_idx"].to_numpy()),
        "samples_per_s": _windows_median(rates),
        "windows": len(rates),
        "epochs_done": summary.get("epochs_done"),
        "best_valid_gauc": summary.get("best_valid_score"),
        "train_seconds": train["seconds"],
        "train_peak_pss_bytes": train["peak_pss_bytes"],
        "evaluate_seconds": ev["seconds"],
    }


def lr_expid(expid: str, lr: float, lrs: list[float], dense_lr: float) -> str:
    """FuxiCTR's experiment id for one learning rate (the plain id when ours' dense rate is the only one)."""
    return expid if lrs == [dense_lr] else f"{expid}_lr{lr:g}"


def best_by_validation(
    runs: dict[Any, dict[str, Any]], rate: str | tuple[str, ...] = "learning_rate"
) -> dict[str, Any]:
    """The run (of one per learning rate: FuxiCTR's ``learning_rate``, our ``sparse_lr``; or one per combination of
    rates, keyed by tuples and named by the tuple ``rate``) with the best validation GAUC, with every run's outcome
    under ``lr_search``; the test split plays no part in the choice."""
    names = rate if isinstance(rate, tuple) else (rate,)

    def rates(key: Any) -> dict[str, Any]:
        return dict(zip(names, key if isinstance(rate, tuple) else (key,), strict=True))

    search = [
        {**rates(key), "best_valid_gauc": r.get("best_valid_gauc"), "test_auc": r["metrics"]["auc"],
         "test_gauc": r["metrics"]["gauc"], "samples_per_s": r.get("samples_per_s"),
         "epochs_run": r.get("epochs_run", r.get("epochs_done"))}
        for key, r in runs.items()
    ]  # fmt: skip
    best = max(runs, key=lambda k: runs[k].get("best_valid_gauc") or -math.inf)
    return {**runs[best], **rates(best), "lr_search": search}


def run_fuxictr(py: Path, expid: str, variant: str, args: argparse.Namespace, work: Path, log_every: int) -> dict:
    from _common import run_measured

    out = work / "runs" / f"fuxictr-{expid}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {
        "config_dir": str(work / "config"),
        "expid": expid,
        "variant": variant,
        "threads": args.threads,
        "log_every": log_every,
        "out": str(out),
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [str(py), str(HERE / "peers_fuxictr.py"), str(out / "spec.json")]
    measured = run_measured(cmd, work / "logs" / f"fuxictr-{expid}.log", cwd=work, env=thread_env(args.threads))
    res = json.loads((out / "result.json").read_text())
    res["samples_per_s"] = _windows_median(res.pop("window_rates"))
    preds = pq.read_table(out / "predictions.parquet")
    res["metrics"] = score(preds["label"].to_numpy(), preds["score"].to_numpy(), preds["user_index"].to_numpy())
    res["predictions"] = str(out / "predictions.parquet")
    res["wall_seconds"] = measured["seconds"]
    res["peak_pss_bytes"] = measured["peak_pss_bytes"]
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a dataset directory built by `ctr build`")
    parser.add_argument("--models", default=",".join(PEERS), help=f"comma-separated, of {','.join(PEERS)}")
    parser.add_argument("--max-len", type=int, default=50, help="behaviors each side reads: the last max_len")
    parser.add_argument("--epochs", type=int, default=None, help="default: ours (train.epochs)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    parser.add_argument("--seed", type=int, default=None, help="both sides' seed (default: ours, train.seed)")
    parser.add_argument(
        "--ours-ranks", type=int, default=1,
        help="also train ours with this many ranks (`ctr train --nproc`) sharing --threads, each with its share of "
        "the batch: extra rows 'defaults, N ranks x T threads' against the same FuxiCTR run (default 1: none)",
    )  # fmt: skip
    parser.add_argument(
        "--ours-compile", action="store_true",
        help="also train ours with train.compile=true (DIN's activation unit compiled; the default `auto` leaves "
        "runs under 2,000 steps eager): extra rows 'defaults, compiled' for the models that have the unit",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None,
        help="loader worker processes of each side, the same count for both (default: our data.num_workers rule, "
        "features.loader.loader_workers: 0, loading in the training process, with at most 2 cores)",
    )  # fmt: skip
    parser.add_argument(
        "--fuxictr-lr", default=None,
        help="FuxiCTR's learning rates, comma-separated (its one Adam trains the tables and the dense part; "
        "default: our optim.dense_lr, 1e-3, where ours trains its tables with Adagrad at optim.sparse_lr). With "
        "more than one, FuxiCTR trains once per rate and each row keeps the run with the best validation gAUC "
        "(its test metrics and samples/s; every rate's result is in the JSON, fuxictr.lr_search)",
    )  # fmt: skip
    parser.add_argument(
        "--ours-sparse-lr", action="append", default=None, metavar="[OPTIMIZER:]RATES",
        help="our tables' rates (optim.sparse_lr), comma-separated: each of our variants trains once per rate, its "
        "row keeping the best validation GAUC as --fuxictr-lr does (default: optim.sparse_lr; all in the JSON, "
        "ours.lr_search). Repeatable, OPTIMIZER:RATES per optimizer of --ours-sparse (adagrad:0.05,0.2 adam:1e-3)",
    )  # fmt: skip
    parser.add_argument(
        "--ours-dense-lr", default=None,
        help="our dense part's learning rates (optim.dense_lr), comma-separated: with --ours-sparse-lr, every pair "
        "trains once and the row keeps the best validation GAUC (default: our optim.dense_lr alone, 1e-3; FuxiCTR's "
        "one Adam trains its dense part at its one rate)",
    )  # fmt: skip
    parser.add_argument(
        "--ours-sparse", default=None,
        help=f"our tables' optimizer (optim.sparse, of {', '.join(SPARSE_OPTIMIZERS)}; default ours, adagrad); adam "
        "is FBGEMM's lazy Adam, the closest to FuxiCTR's one Adam. Comma-separated: searched too, each at its "
        "rates (--ours-sparse-lr OPTIMIZER:RATES), the row keeping the best validation GAUC over all",
    )  # fmt: skip
    parser.add_argument(
        "--ours-set", action="append", default=[], metavar="KEY=VALUE",
        help="an extra `ctr train --set` for every one of our runs (repeatable), e.g. model.embedding_init=1.7e-4",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifelong-ctr-peers"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in models if m not in PEERS]:
        parser.error(f"--models: {unknown} have no FuxiCTR peer here (known: {', '.join(PEERS)})")
    if not (args.data / "manifest.json").exists():
        parser.error(f"--data {args.data}: no manifest.json (build it with `ctr build`)")
    sys.path.insert(0, str(HERE))
    from _common import JobError, machine_info

    work = args.work.resolve()
    for sub in ("logs", "runs", "config"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    py = ensure_fuxictr_venv(work)
    print(f"converting {args.data} to LongCTR input in {work / 'data' / DATASET_ID}", flush=True)
    conv = convert_dataset(args.data, work / "data" / DATASET_ID)
    defaults = {m: our_config(m, []) for m in models}
    if args.epochs is None:
        args.epochs = int(defaults[models[0]]["train"]["epochs"])
    if args.workers is None:
        from features.loader import loader_workers

        args.workers = loader_workers(defaults[models[0]]["data"]["num_workers"])

    import yaml

    dense_lr = float(defaults[models[0]]["optim"]["dense_lr"])
    fx_lrs = [float(x) for x in args.fuxictr_lr.split(",")] if args.fuxictr_lr else [dense_lr]
    try:
        sparse_opts, ours_lrs = sparse_search(args.ours_sparse, args.ours_sparse_lr)
    except ValueError as e:
        parser.error(str(e))
    ours_dense_lrs = [float(x) for x in args.ours_dense_lr.split(",")] if args.ours_dense_lr else None
    steps_per_epoch = max(1, math.ceil(conv["rows"]["train"] / args.batch_size))
    log_every = max(1, steps_per_epoch // 5)
    plans = []
    model_cfg: dict[str, Any] = {"Base": base_config(work, defaults[models[0]], args.workers)}
    for model in models:
        sets = our_overrides(model, defaults[model], args)
        if len(sparse_opts) == 1 and sparse_opts[0] is not None:
            sets.append(f"optim.sparse={sparse_opts[0]}")
        sets.extend(args.ours_set)
        cfg = our_config(model, sets)
        peer = PEERS[model]
        params = fuxictr_params(peer, cfg, args)
        variants = ["as shipped", "post-padded"] if peer == "DIEN" else ["as shipped"]
        ours_variants = [(OURS_DEFAULTS, sets)]
        if args.ours_ranks > 1:  # the same defaults, trained by ranks that share the threads (ctr train --nproc)
            per_rank = [*sets, f"data.batch_size={args.batch_size // args.ours_ranks}"]
            ours_variants.append((ranks_variant(args), per_rank))
        if args.ours_compile and has_din_unit(model, cfg):
            ours_variants.append((OURS_COMPILED, [*sets, "train.compile=true"]))
        if peer in ARCH_PEERS:
            ours_variants.append((OURS_PEER_ARCH, sets + architecture_sets(peer, params, cfg)))
        for v in variants:
            expid = f"{peer}_peers" + ("_post" if v == "post-padded" else "")
            for lr in fx_lrs:
                model_cfg[lr_expid(expid, lr, fx_lrs, dense_lr)] = params | {"learning_rate": lr}
            for ours_variant, ours_sets in ours_variants:
                plans.append((model, peer, v, expid, ours_variant, ours_sets))
    (work / "config" / "model_config.yaml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (work / "config" / "dataset_config.yaml").write_text(
        yaml.safe_dump(dataset_config(conv, work / "data"), sort_keys=False)
    )

    rows: list[dict[str, Any]] = []
    ours_done: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {}

    def save() -> None:
        result.update({
            "machine": machine_info(),
            "dataset": str(args.data.resolve()),
            "work": str(work),
            "settings": {"max_len": args.max_len, "batch_size": args.batch_size, "epochs": args.epochs,
                         "threads": args.threads, "log_every_steps": log_every, "loader_workers_each": args.workers,
                         "seed": int(defaults[models[0]]["train"]["seed"]) if args.seed is None else args.seed,
                         "fuxictr_learning_rates": fx_lrs, "fuxictr_lr_choice": "best validation gAUC",
                         "ours_sparse": args.ours_sparse or str(defaults[models[0]]["optim"]["sparse"]),
                         "ours_sparse_lrs": (ours_lrs or {}).get(None, ours_lrs), "ours_dense_lrs": ours_dense_lrs,
                         "ours_extra_sets": args.ours_set,
                         "ours_lr_choice": "best validation GAUC" if ours_lrs or len(sparse_opts) > 1 else None,
                         "quality_delta": f"ours minus FuxiCTR, paired bootstrap over test users, {RESAMPLES} "
                         "resamples, 95% percentile interval (ctr.evaluation.metrics.paired_bootstrap)"},
            "fuxictr": {"version": FUXICTR_VERSION, "venv": str(py.parents[1]), "torch": TORCH_PIN,
                        "configs": str(work / "config")},
            "gauc_definition": "per-user AUC over users with both classes, weighted by the user's impressions "
            "(ctr.evaluation.metrics.gauc; FuxiCTR's gAUC is the same definition)",
            "differences": [
                "sparse tables: ours settings.ours_sparse (Adagrad by default; adam: FBGEMM's lazy Adam, only the rows "
                "a step looks up move; several: each row's optimizer chosen with its rates on validation, ours.sparse) "
                "at optim.sparse_lr; FuxiCTR's one Adam (dense: every row's moments decay and "
                "every row moves each step) trains tables and dense part at "
                "the rate of settings.fuxictr_learning_rates with the best validation gAUC (ours' dense rate unless "
                "--fuxictr-lr)",
                "dense part: ours Adam at optim.dense_lr (1e-3; chosen on validation with the tables' rate among "
                "settings.ours_dense_lrs when given), FuxiCTR's at its one rate",
                "dien: ours adds the auxiliary loss (model.aux_alpha); FuxiCTR's LongCTR DIEN has none",
                "sim_soft/eta/sdim/twin at our defaults: our short-term branch is DIN-style attention over the "
                "last short_len behaviors; FuxiCTR's is multi-head target attention over short_seq_len - 1 (defect "
                "(f)); rows with ours as \"FuxiCTR's architecture\" use its short branch (architecture_sets)",
                "twin at our defaults: ours has time/btype cross features; FuxiCTR runs Kc_cross_features=0",
                "sdim: FuxiCTR's short attention uses its default attention_dim 64, one head",
            ],
            "results": rows,
            "fuxictr_defects": defects_report(rows),
        })  # fmt: skip
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2, default=float) + "\n")

    fuxictr_done: dict[str, dict[str, Any]] = {}
    for model, peer, variant, expid, ours_variant, sets in plans:
        row: dict[str, Any] = {"model": model, "peer": peer, "variant": variant, "ours_variant": ours_variant}
        nproc = args.ours_ranks if ours_variant == ranks_variant(args) else 1
        run_names = {
            OURS_DEFAULTS: model, OURS_PEER_ARCH: f"{model}_{peer.lower()}_arch", OURS_COMPILED: f"{model}_compiled"
        }  # fmt: skip
        key = run_names.get(ours_variant, f"{model}_ranks")
        if key not in ours_done:
            print(f"[ours] {model} ({ours_variant}): ctr train + ctr evaluate", flush=True)
            try:
                grid, names = search_grid(sparse_opts, ours_dense_lrs, ours_lrs)
                if not names:
                    ours_done[key] = run_ours(model, sets, args, work, log_every, run_name=key, nproc=nproc)
                else:  # one run per rate (or combination), the best validation GAUC kept (as FuxiCTR's rates)
                    runs = {}
                    for point in grid:
                        extra, name = [], key
                        for dim, value in zip(names, point, strict=True):
                            extra.append(f"optim.{dim}={value:g}" if dim != "sparse" else f"optim.sparse={value}")
                            name += f"_{SEARCH_TAGS[dim]}{value:g}" if dim != "sparse" else f"_{value}"
                        runs[point if len(names) > 1 else point[0]] = run_ours(
                            model, [*sets, *extra], args, work, log_every, run_name=name, nproc=nproc
                        )
                    ours_done[key] = best_by_validation(runs, rate=names if len(names) > 1 else names[0])
            except JobError as e:
                ours_done[key] = {"error": str(e)[:300]}
        row["ours"] = ours_done[key]
        if expid not in fuxictr_done:  # one FuxiCTR run serves both of our variants
            print(f"[fuxictr] {peer} ({variant})", flush=True)
            try:
                runs = {lr: run_fuxictr(py, lr_expid(expid, lr, fx_lrs, dense_lr), variant, args, work, log_every)
                        for lr in fx_lrs}  # fmt: skip
                fuxictr_done[expid] = best_by_validation(runs)
            except (JobError, FileNotFoundError) as e:
                fuxictr_done[expid] = {"error": str(e)[:300]}
        row["fuxictr"] = fuxictr_done[expid]
        if "run" in row["ours"] and "predictions" in row["fuxictr"]:
            row["quality_delta"] = paired_quality(
                Path(row["ours"]["run"]) / "predictions.parquet", Path(row["fuxictr"]["predictions"])
            )
        rows.append(row)
        save()
    print()
    print(table(rows))
    print()
    print("FuxiCTR 2.3.10 defects (details and file:line in the JSON, fuxictr_defects):")
    for key, d in result["fuxictr_defects"].items():
        state = {True: "confirmed", False: "NOT confirmed", None: "not exercised"}[d["confirmed"]]
        print(f"  ({key}) {d['claim']}: {state}; workaround: {d['workaround']}")
        if key in ("b", "c", "d", "e"):
            print(f"      measured: {json.dumps(d.get('measured'), default=str)[:400]}")
        if d.get("note"):
            print(f"      note: {d['note']}")
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
