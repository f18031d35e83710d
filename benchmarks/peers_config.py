"""`peers.py`'s configs: our overrides and resolved config, and FuxiCTR's model, dataset and base configs written
from ours (the same embedding size, towers, attention sizes, max_len, batch, learning rate, epochs, patience, seed,
loader workers)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = "peers"
ACTIVATIONS = {"sigmoid": "Sigmoid", "relu": "ReLU", "prelu": "PReLU", "dice": "Dice"}


def _ctr() -> str:
    return str(Path(sys.executable).with_name("ctr"))


def our_overrides(model: str, cfg: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The --set's that give our run the benchmark's window, batch and epochs (applied to the printed defaults)."""
    sets = [f"data.batch_size={args.batch_size}", f"train.epochs={args.epochs}"]
    if getattr(args, "seed", None) is not None:  # peers.py --seed: ours, and FuxiCTR's config copies it from ours
        sets.append(f"train.seed={args.seed}")
    if getattr(args, "workers", None) is not None:  # peers.py: the loader workers both sides use (--workers)
        sets.append(f"data.num_workers={args.workers}")
    m = cfg["model"]
    if "seq_len" in m:  # din, dien: the last seq_len behaviors
        sets.append(f"model.seq_len={args.max_len}")
    if "max_len" in m:  # two-stage: the GSU's window over the prefix
        sets.append(f"model.max_len={args.max_len}")
        if m.get("short_len", 0) > args.max_len:
            sets.append(f"model.short_len={args.max_len}")
    # the trainer splits a batch whose padded behaviors exceed data.max_batch_behaviors: raised where the window
    # needs it, so our batches keep FuxiCTR's size (the cap counts every view: twice the window plus the short one
    # always fits, DIEN's sampled negatives included)
    need = args.batch_size * (2 * args.max_len + min(int(m.get("short_len", 0)), args.max_len))
    if need > int(cfg.get("data", {}).get("max_batch_behaviors") or 0):
        sets.append(f"data.max_batch_behaviors={need}")
    return sets


def our_config(model: str, sets: list[str]) -> dict[str, Any]:
    import yaml

    out = subprocess.run(
        [_ctr(), "train", "--model", model, "--print-config", *[x for s in sets for x in ("--set", s)]],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    return yaml.safe_load(out.stdout)


def fuxictr_params(peer: str, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """FuxiCTR's model_config section for `peer`, from our resolved config `cfg`."""
    m, train, optim = cfg["model"], cfg["train"], cfg["optim"]
    p: dict[str, Any] = {
        "model": peer,
        "dataset_id": DATASET_ID,
        "loss": "binary_crossentropy",
        "metrics": ["AUC", "gAUC", "logloss"],
        "task": "binary_classification",
        "optimizer": "adam",
        "learning_rate": float(optim["dense_lr"]),
        "embedding_regularizer": 0,
        "net_regularizer": float(optim.get("weight_decay") or 0),
        "batch_size": int(cfg["data"]["batch_size"]),
        "embedding_dim": int(m["embedding_dim"]),
        "dnn_hidden_units": list(m["hidden"]),
        "dnn_activations": ACTIVATIONS[m["activation"]],
        "net_dropout": float(m.get("dropout") or 0),
        "batch_norm": bool(m.get("batch_norm", False)),
        "epochs": int(train["epochs"]),
        "shuffle": True,
        "seed": int(train["seed"]),
        "monitor": "gAUC",  # ours keeps the best validation GAUC
        "monitor_mode": "max",
        "early_stop_patience": int(train["patience"]),
        "reduce_lr_on_plateau": False,  # ours: optim.lr_decay_per_epoch (1.0: none)
        "max_gradient_norm": float(optim.get("clip_norm") or 1e9),
        "max_len": int(args.max_len),
        "padding": "pre",
        "accumulation_steps": 1,
    }
    if peer == "DIN":
        p |= {
            "attention_hidden_units": list(m["attention_hidden"]),
            "attention_hidden_activations": ACTIVATIONS[m["attention_activation"]],
            "attention_output_activation": None,
            "attention_dropout": 0,
            "din_use_softmax": bool(m["softmax"]),
        }
    elif peer == "DIEN":
        p |= {
            "gru_type": "AUGRU",
            "enable_sum_pooling": False,
            "attention_type": {"bilinear": "bilinear_attention", "din": "din_attention"}[m["attention"]],
            "attention_hidden_units": list(m["attention_hidden"]),
            "attention_activation": ACTIVATIONS[m["attention_activation"]],
            "attention_dropout": 0,
            "use_attention_softmax": True,
        }
    else:
        heads, head_dim = {
            "SIM": (m.get("esu_heads"), m.get("esu_head_dim")),
            "ETA": (m.get("esu_heads"), m.get("esu_head_dim")),
            "TWIN": (m.get("heads"), m.get("head_dim")),
        }.get(peer, (None, None))
        p |= {
            "num_heads": int(heads or 1),
            "attention_dim": int((heads or 1) * (head_dim or 64)),
            "attention_dropout": 0,
            "short_seq_len": int(m["short_len"]),
        }
        if peer == "SIM":
            p |= {"gsu_type": "soft", "topk": int(m["k"]), "alpha": float(m.get("aux_alpha", 1.0)), "beta": 1.0}
        elif peer == "ETA":
            p |= {"topk": int(m["k"]), "hash_bits": int(m["hash_bits"]), "reuse_hash": True, "use_scale": True}
        elif peer == "SDIM":
            p |= {"num_hashes": int(m["num_hashes"]), "hash_bits": int(m["hash_bits"]), "reuse_hash": True,
                  "use_scale": True, "use_qkvo": True, "l2_norm": bool(m.get("normalize", False))}  # fmt: skip
        elif peer == "TWIN":
            p |= {"topk": int(m["k"]), "Kc_cross_features": 0}
    return p


def dataset_config(conv: dict[str, Any], data_root: Path) -> dict[str, Any]:
    """FuxiCTR's dataset_config section: pre-indexed data (rebuild_dataset: false, vocab sizes given), the item
    features marked `source: item` (looked up through item_info), the sample's context features."""
    vocab = conv["vocab_sizes"]
    cols: list[dict[str, Any]] = [
        {"name": ["user_index", "item_index", "seq_len"], "active": True, "dtype": "int", "type": "meta",
         "remap": False},
        {"name": "item_id", "active": True, "dtype": "int", "type": "categorical", "source": "item",
         "vocab_size": vocab["item"]},
        {"name": "cate_id", "active": True, "dtype": "int", "type": "categorical", "source": "item",
         "vocab_size": vocab["cate"]},
    ]  # fmt: skip
    for c in conv["context_columns"]:
        cols.append({"name": c, "active": True, "dtype": "int", "type": "categorical", "source": "context",
                     "vocab_size": vocab[c]})  # fmt: skip
    return {
        DATASET_ID: {
            "data_root": str(data_root),
            "data_format": "parquet",
            "train_data": conv["train"],
            "valid_data": conv["valid"],
            "test_data": conv["test"],
            "user_info": conv["user_info"],
            "item_info": conv["item_info"],
            "rebuild_dataset": False,
            "feature_cols": cols,
            "label_col": {"name": "label", "dtype": "int"},
        }
    }


def base_config(work: Path, cfg: dict[str, Any], workers: int) -> dict[str, Any]:
    return {
        "model_root": str(work / "checkpoints"),
        "num_workers": workers,  # the loader worker processes ours uses too (data.num_workers)
        "verbose": 0,
        "pickle_feature_encoder": False,
        "save_best_only": True,
        "eval_steps": None,  # once per epoch, like ours (train.eval_every: null)
        "debug_mode": False,
        "group_id": "user_index",
        "use_features": None,
        "feature_specs": None,
        "feature_config": None,
    }


SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd", "adam")
SEARCH_TAGS = {"dense_lr": "dlr", "sparse_lr": "slr"}  # run-name tags of the searched rates


def sparse_search(
    optimizers: str | None, rate_args: list[str] | None
) -> tuple[list[str | None], dict[str | None, list[float]] | None]:
    """--ours-sparse and --ours-sparse-lr read: the tables' optimizers searched (``[None]``: the config's one) and the
    tables' rates of each (None: the config's rate), a plain list applying to every optimizer."""
    opts: list[str | None] = [o.strip() for o in optimizers.split(",") if o.strip()] if optimizers else [None]
    if unknown := [o for o in opts if o is not None and o not in SPARSE_OPTIMIZERS]:
        raise ValueError(f"--ours-sparse: {unknown} are not tables' optimizers (known: {', '.join(SPARSE_OPTIMIZERS)})")
    if not rate_args:
        return opts, None
    rates: dict[str | None, list[float]] = {}
    for arg in rate_args:
        opt, _, values = arg.rpartition(":")
        target = [opt] if opt else opts
        if opt and opt not in opts:
            raise ValueError(f"--ours-sparse-lr {arg}: {opt} is not in --ours-sparse ({optimizers or 'the default'})")
        for o in target:
            rates[o] = [float(x) for x in values.split(",") if x.strip()]
    if missing := [o for o in opts if o not in rates]:
        raise ValueError(f"--ours-sparse-lr: no rates for {missing} (give OPTIMIZER:RATES for each, or one list)")
    return opts, rates


def search_grid(
    opts: list[str | None], dense_lrs: list[float] | None, sparse_lrs: dict[str | None, list[float]] | None
) -> tuple[list[tuple[Any, ...]], tuple[str, ...]]:
    """Our runs of one variant as points of (tables' optimizer when several, dense rate when searched, tables' rate
    when searched), with the names of those dimensions; no names: one run at the config's settings."""
    names = (("sparse",) if len(opts) > 1 else ()) + (("dense_lr",) if dense_lrs else ())
    names += ("sparse_lr",) if sparse_lrs else ()
    grid = []
    for o in opts:
        for d in dense_lrs or [None]:
            for s in (sparse_lrs or {}).get(o) or [None]:
                point = ((o, len(opts) > 1), (d, bool(dense_lrs)), (s, bool(sparse_lrs)))
                grid.append(tuple(v for v, on in point if on))
    return grid, names


__all__ = [
    "ACTIVATIONS", "DATASET_ID", "SEARCH_TAGS", "SPARSE_OPTIMIZERS", "base_config", "dataset_config",
    "fuxictr_params", "our_config", "our_overrides", "search_grid", "sparse_search",
]  # fmt: skip
