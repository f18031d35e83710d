"""`python -m cli.precompile`: byte-compile, once at setup, the modules a run of this project imports.

`make setup` installs without byte-compiling (pip's ``--no-compile``; uv never does): compiling every module of
the dependencies (torch, Ray, TorchRec: 2.7 GB of site-packages) took about 40 s of a 2-core machine's setup, for
modules no run imports. Python writes the cache of a module on its first import instead, except where
``PYTHONDONTWRITEBYTECODE`` is set (some CI images and sandboxes set it): there every process would compile
torch's and TorchRec's modules again, about 7 s of every start. So setup imports, once and with the cache switched
on, every module of ours and every module any of our files (tests and benchmarks included) names in an import
statement, at the top or inside a function (the heavy ones, TorchRec's sharding and Ray Data, are imported lazily).
Every module of ours is import-safe: importing one runs no job.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("features", "pipelines", "kernels", "ctr", "cli")
SCANNED = (*PACKAGES, "tests", "benchmarks")  # whose import statements name the dependencies' modules
ROOT = Path(__file__).resolve().parent.parent
EXTRA = ("pytest", "xdist", "torch.distributed.run")  # what pytest -n and the multi-process tests start


def imported_names(root: Path = ROOT) -> set[str]:
    """The absolute module names in every import statement of our source files (``from a.b import c``: ``a.b``)."""
    names: set[str] = set()
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
    return names


def module_names() -> list[str]:
    """Every module of our packages (`pkgutil.walk_packages` imports the packages themselves to find their
    subpackages, which is safe: importing runs no job), then every other module our files import."""
    names: list[str] = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        names.append(pkg)
        for info in pkgutil.walk_packages(list(spec.submodule_search_locations), prefix=pkg + "."):
            if info.name != __name__ and not info.name.endswith(".__main__"):  # a __main__ runs its command
                names.append(info.name)
    ours = set(names) | {"tests", "benchmarks"}
    for folder in ("tests", "benchmarks"):  # their own helper modules, found through their folder on sys.path
        ours |= {p.stem if p.is_file() else p.name for p in (ROOT / folder).rglob("*")}
    others = {n for n in imported_names() | set(EXTRA) if n.split(".")[0] not in ours and n != "__main__"}
    return names + sorted(others)


TORCH_FAMILY = {"torch", "torchrec", "fbgemm_gpu", "triton", "tensordict", "torchmetrics", *PACKAGES}


def split(names: list[str]) -> tuple[list[str], list[str]]:
    """(ours and the torch family's, the rest): two processes' shares, about equal on the demo's machine (the
    torch family imports in about 18 s uncompiled, Ray, polars, Arrow, matplotlib and the test tools in 12)."""
    first = [n for n in names if n.split(".")[0] in TORCH_FAMILY]
    return first, [n for n in names if n.split(".")[0] not in TORCH_FAMILY]


def main(argv: list[str] | None = None) -> int:
    """Import each module with the bytecode cache on, the torch family here and the rest in a second process at the
    same time (``--rest``: be that process); a module that fails to import is logged, not fatal."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.dont_write_bytecode = False  # what PYTHONDONTWRITEBYTECODE sets; its point here is to write the cache
    os.environ.setdefault("LIFELONG_CTR_NATIVE", "0")  # the operators build in their own process (make setup)
    started = time.perf_counter()
    rest_only = "--rest" in (sys.argv[1:] if argv is None else argv)
    first, rest = split(module_names())
    names = rest if rest_only else first
    other = None if rest_only else subprocess.Popen([sys.executable, "-m", "cli.precompile", "--rest"], cwd=ROOT)
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - optional ones (pyspark, fuxictr) may be absent; the rest still count
            failed.append(f"{name} ({type(exc).__name__})")
    status = 0 if other is None else other.wait()
    took = time.perf_counter() - started
    log.info("precompiled the imports of %d modules in %.1f s", len(names) - len(failed), took)
    if failed:
        log.info("not importable here (optional): %s", ", ".join(failed))
    return status


if __name__ == "__main__":
    sys.exit(main())
