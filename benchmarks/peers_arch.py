"""`peers.py`'s architecture-equal rows: the overrides that give our model FuxiCTR LongCTR's architecture."""

from __future__ import annotations

import json
from typing import Any

# Our side of the rows: "defaults" (each tool at its own architecture) and, for the models with a short window,
# "FuxiCTR's architecture": FuxiCTR LongCTR's short branch (multi-head target attention, its heads and width), no
# u ⊙ e_t in the tower, and what else its model lacks (SIM/ETA: the ESU's time embedding; TWIN: the cross features;
# SIM: the auxiliary tower's activation is the main tower's); for DIEN, no auxiliary loss and no sum pooling
OURS_DEFAULTS, OURS_PEER_ARCH = "defaults", "FuxiCTR's architecture"
# --ours-compile: our defaults with DIN's activation unit compiled (train.compile=true; `auto` leaves runs this short
# eager), for the models that have the unit (DIN, and the two-stage models whose short branch is DIN's)
OURS_COMPILED = "defaults, compiled"


def has_din_unit(model: str, cfg: dict[str, Any]) -> bool:
    """Whether our `model` (resolved config `cfg`) trains a DIN activation unit, which train.compile compiles."""
    return model == "din" or cfg["model"].get("short_attention") == "din"


ARCH_PEERS = ("DIEN", "SIM", "ETA", "SDIM", "TWIN")  # the peers with an architecture-equal row


def architecture_sets(peer: str, params: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The --set's that give our `peer` model FuxiCTR's architecture (`params`: FuxiCTR's model config for it)."""
    if peer == "DIEN":  # FuxiCTR's LongCTR DIEN has no auxiliary loss and, by default, no sum pooling in the tower
        return ["model.aux_alpha=0", f"model.sum_pooling={str(bool(params['enable_sum_pooling'])).lower()}"]
    heads = int(params["num_heads"])
    sets = [
        "model.short_attention=mhta",
        f"model.short_heads={heads}",
        f"model.short_head_dim={int(params['attention_dim']) // heads}",
        "model.target_cross=false",
    ]
    if peer in ("SIM", "ETA"):
        sets.append("model.time_buckets=0")
    if peer == "SIM":
        sets.append(f"model.aux_activation={cfg['model']['activation']}")
        sets.append(f"model.aux_hidden={json.dumps(list(cfg['model']['hidden']))}")
    if peer == "TWIN":
        sets += ["model.time_buckets=0", "model.use_btype=false"]
    return sets


__all__ = ["ARCH_PEERS", "OURS_COMPILED", "OURS_DEFAULTS", "OURS_PEER_ARCH", "architecture_sets", "has_din_unit"]
