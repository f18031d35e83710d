"""Models by name: `get_model_class("din")`. Each file in this package registers its model with `@register`."""

from __future__ import annotations

import importlib
import pkgutil

from .base import MODELS, CTRModel, ModelOutput, ModelParams, get_model_class, model_names, register

__all__ = ["MODELS", "CTRModel", "ModelOutput", "ModelParams", "get_model_class", "model_names", "register"]


def _import_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
