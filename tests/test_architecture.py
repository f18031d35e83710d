"""The import rule of ARCHITECTURE.md, read from the source: every import, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "features", "pipelines", "ctr", "cli")

# What each top-level package may import of ours (itself always).
ALLOWED = {
    "kernels": set(),
    "features": set(),
    "pipelines": {"features"},
    "ctr": {"features", "kernels"},
    "cli": {"features", "pipelines", "ctr", "kernels"},
}
# Inside ctr, what each part may import: arrows run one way, from the CLI down to the modules.
CTR_ALLOWED = {
    "modules": {"native"},
    "native": set(),  # native CPU operators (ctr/native): a leaf under the modules that use them
    "malloc": set(),  # the process's allocator settings: a leaf the training and scoring processes call
    "models": {"modules"},
    "config": {"models"},
    "runs": {"config", "models"},
    "evaluation": {"runs", "config", "models", "malloc"},
    "train": {"evaluation", "runs", "config", "models", "modules", "malloc", "native"},
    "report": {"evaluation", "runs"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file (or in `text`, read as that file), relative ones
    resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from ctr import runs` names a submodule: count it as an arrow to ctr.runs
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if target in ("ctr", "pipelines")]
    return out


def _wrong_way(src: str, target: str) -> bool:
    """Does the import of `target` by module `src` run against the rule?"""
    pkg, top = src.split(".")[0], target.split(".")[0]
    if top not in PACKAGES:
        return False  # the standard library or a third-party package
    if top != pkg:
        return top not in ALLOWED[pkg]
    a, b = src.split("."), target.split(".")
    if pkg != "ctr" or len(a) < 2 or len(b) < 2 or a[1] == b[1] or a[1] not in CTR_ALLOWED:
        return False
    return b[1] not in CTR_ALLOWED[a[1]]


def _violations(extra: dict[Path, str] | None = None) -> list[str]:
    """Every arrow against the rule, in the repository's files plus `extra` (path -> source, not on disk)."""
    files = {path: None for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))} | dict(extra or {})
    return [
        f"{path.relative_to(ROOT)}:{line}: {_module_name(path)} imports {target}"
        for path, text in files.items()
        for line, target in _imports(path, text)
        if _wrong_way(_module_name(path), target)
    ]


def test_imports_follow_the_rule():
    assert _violations() == []


def test_the_rule_catches_a_function_level_import():
    """The checker itself: an arrow hidden in a function (evaluation -> train) is found."""
    probe = ROOT / "ctr" / "evaluation" / "_arrow_probe.py"
    found = _violations(
        {
            probe: "def f():\n    from ..train import trainer  # noqa: F401\n",
            ROOT / "features" / "_arrow_probe.py": "import json\nimport ctr.runs\n",
            ROOT / "ctr" / "models" / "_ok_probe.py": "from ..modules import gsu\nimport kernels\n",
        }
    )
    assert any("features/_arrow_probe.py:2: features._arrow_probe imports ctr.runs" in v for v in found), found
    assert not any("_ok_probe" in v for v in found), found
    assert any("_arrow_probe.py:2: ctr.evaluation._arrow_probe imports ctr.train" in v for v in found), found


def test_every_ctr_part_is_placed():
    parts = {p.name if p.is_dir() else p.stem for p in (ROOT / "ctr").iterdir() if not p.name.startswith("__")}
    assert parts <= set(CTR_ALLOWED), parts - set(CTR_ALLOWED)


def test_kernels_do_not_need_torchrec():
    """The GPU machines that run the kernel benchmarks have torch and Triton, not TorchRec."""
    paths = [*(ROOT / "kernels").rglob("*.py"), *(ROOT / "benchmarks").glob("kernel*.py")]
    for path in sorted([*paths, *(ROOT / "benchmarks" / "kernel_bench").rglob("*.py")]):
        for line, target in _imports(path):
            assert target.split(".")[0] not in ("torchrec", "fbgemm_gpu"), f"{path.relative_to(ROOT)}:{line}"
