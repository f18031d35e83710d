"""Run state on disk, one generation at a time.

A checkpoint is a *generation*: one directory per step holding every rank's file, published by a small
`COMPLETE.json` that rank 0 writes last (after every rank has written and renamed its own file into place)::

    RUN_DIR/checkpoints/gen-000000120/rank0.pt ... rank{W-1}.pt   weights, optimizers, scheduler, RNG states,
                                                                    loader position, early-stopping state
    RUN_DIR/checkpoints/gen-000000120/COMPLETE.json                 step, world size, batch size, dataset
                                                                    fingerprint, resolved config, rank files

A generation without `COMPLETE.json` (a kill fell while it was written) is never loaded: `--resume` takes the newest
complete one and says which partial ones it skipped. Files hold only tensors and plain containers, so they load
with `torch.load(weights_only=True)`. Resuming with another world size, batch size, dataset or config is refused
with a message that names what differs; only the keys in `RESUMABLE_CHANGES` (how long to train, how often to log
and checkpoint, loader processes, `train.compile`) may change between the run and its resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError

log = logging.getLogger(__name__)

GEN_PREFIX = "gen-"
COMPLETE = "COMPLETE.json"
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_steps",
        "train.epochs",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "data.num_workers",
        "train.compile",  # how the step is computed, not what: the same model to float rounding
        "optim.sparse_cpu_kernel",  # likewise (and absent from checkpoints written before it existed)
    }
)


def generation_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"{GEN_PREFIX}{step:09d}"


def rank_file(gen: Path, rank: int) -> Path:
    return gen / f"rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    version, inner, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": version, "state": list(inner), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_rank(gen: Path, rank: int, payload: dict[str, Any]) -> None:
    """Write this rank's file of a generation (aside, then renamed into place)."""
    gen.mkdir(parents=True, exist_ok=True)
    tmp = gen / f".rank{rank}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, rank_file(gen, rank))


def publish(gen: Path, meta: dict[str, Any], keep: int) -> None:
    """Rank 0, after every rank's `save_rank` (a barrier): mark the generation complete, drop all but the newest
    `keep` complete generations (and any partial one)."""
    tmp = gen / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, gen / COMPLETE)
    complete = [g for g in _generations(gen.parent) if _is_complete(g)]
    kept = set(complete[:keep])
    for g in _generations(gen.parent):
        if g not in kept:
            shutil.rmtree(g, ignore_errors=True)


def _generations(ckpt_dir: Path) -> list[Path]:
    """Generation directories, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(GEN_PREFIX)), reverse=True)


def _is_complete(gen: Path) -> bool:
    path = gen / COMPLETE
    if not path.exists():
        return False
    meta = json.loads(path.read_text())
    return all(rank_file(gen, r).exists() for r in range(int(meta["world_size"])))


def latest_complete(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete generation and its COMPLETE.json, skipping (and naming) partial ones."""
    for gen in _generations(ckpt_dir):
        if _is_complete(gen):
            return gen, json.loads((gen / COMPLETE).read_text())
        log.warning(
            "--resume: skipping %s: an incomplete checkpoint generation (a kill fell while it was written)", gen
        )
    return None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def check_resumable(gen: Path, meta: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume `gen` under a different world size, dataset or config; the message names what differs."""
    diffs = []
    if meta["world_size"] != now["world_size"]:
        diffs.append(f"world size {meta['world_size']} (now {now['world_size']}: use the same --nproc)")
    if meta["dataset_fingerprint"] != now["dataset_fingerprint"]:
        diffs.append(
            f"dataset {meta['data_dir']} with fingerprint {meta['dataset_fingerprint'][:12]} (now {now['data_dir']} "
            f"with {now['dataset_fingerprint'][:12]}: the dataset was rebuilt or is another one)"
        )
    old, new = flatten(meta["config"]), flatten(now["config"])
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            diffs.append(f"{key}={old.get(key)!r} (now {new.get(key)!r})")
    if diffs:
        raise ConfigError(
            f"--resume: the checkpoint {gen} was written with " + "; ".join(diffs) + ". How to fix: resume with "
            "the same settings, or start again with --overwrite"
        )


def load_rank(gen: Path, rank: int) -> dict[str, Any]:
    return torch.load(rank_file(gen, rank), map_location="cpu", weights_only=True)
