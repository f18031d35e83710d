"""Registers, spills, shared memory, warps and stages of the Triton kernels a run compiled
(`kernels.triton.introspect`), found without naming them: every Triton kernel among the attributes of the loaded
``kernels.triton.*`` modules (and of the FBGEMM peer's module), so that renamed or new kernels are found too."""

from __future__ import annotations

import sys
import types
from typing import Any

PACKAGE = "kernels.triton"


def triton_modules(extra: tuple[types.ModuleType, ...] = ()) -> list[types.ModuleType]:
    """The loaded modules of `kernels.triton` (they are imported lazily, on an op's first Triton call), and
    ``extra``."""
    loaded = [m for name, m in sorted(sys.modules.items()) if name.startswith(PACKAGE + ".") and m is not None]
    return loaded + [m for m in extra if m not in loaded]


class KernelStats:
    """Snapshots of every compiled specialization; `new` returns those compiled since the previous call (a case's
    own compilations), `all` every one so far."""

    def __init__(self, extra: tuple[types.ModuleType, ...] = ()) -> None:
        self.extra = extra
        self.seen: set[tuple[str, str, str]] = set()

    def all(self) -> list[dict[str, Any]]:
        """Every compiled specialization of the kernels of the loaded modules ([] where nothing compiled)."""
        try:
            from kernels.triton.introspect import compiled_stats, module_kernels
        except Exception:  # Triton missing or broken: there is nothing compiled to report
            return []
        stats, done = [], set()
        for module in triton_modules(self.extra):
            for kernel in module_kernels(module).values():
                if id(kernel) in done:
                    continue
                done.add(id(kernel))
                stats += [{"module": module.__name__, **row} for row in compiled_stats(kernel)]
        # A kernel imported into another module is found twice, once per module: keep its first sighting.
        unique: dict[tuple[str, str, str], dict[str, Any]] = {}
        for row in stats:
            unique.setdefault((row["function"], row["device"], row["key"]), row)
        return list(unique.values())

    def new(self) -> list[dict[str, Any]]:
        """The specializations compiled since the previous call."""
        fresh = [row for row in self.all() if (row["function"], row["device"], row["key"]) not in self.seen]
        self.seen.update((row["function"], row["device"], row["key"]) for row in fresh)
        return fresh
