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
    "modules": set(),
    "models": {"modules"},
    "config": {"models"},
    "runs": {"config", "models"},
    "evaluation": {"runs", "config", "models"},
    "train": {"evaluation", "runs", "config", "models", "modules"},
    "report": {"evaluation", "runs"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


def _violations() -> list[str]:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            src = _module_name(path)
            for line, target in _imports(path):
                top = target.split(".")[0]
                if top not in PACKAGES or top == pkg:
                    if pkg == "ctr" and top == "ctr":
                        a, b = src.split("."), target.split(".")
                        if len(a) > 1 and len(b) > 1 and a[1] != b[1]:
                            if a[1] in CTR_ALLOWED and b[1] not in CTR_ALLOWED[a[1]] | {a[1]}:
                                bad.append(f"{path.relative_to(ROOT)}:{line}: ctr.{a[1]} imports {target}")
                    continue
                if top not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {pkg} imports {target}")
    return bad


def test_imports_follow_the_rule():
    assert _violations() == []


def test_the_rule_catches_a_function_level_import(tmp_path, monkeypatch):
    """The checker itself: an arrow hidden in a function (evaluation -> train) is found."""
    fake = ROOT / "ctr" / "evaluation" / "_arrow_probe.py"
    fake.write_text("def f():\n    from ..train import trainer  # noqa: F401\n")
    try:
        found = _violations()
    finally:
        fake.unlink()
    assert any("_arrow_probe.py:2: ctr.evaluation imports ctr.train" in v for v in found), found


def test_every_ctr_part_is_placed():
    parts = {p.name if p.is_dir() else p.stem for p in (ROOT / "ctr").iterdir() if not p.name.startswith("__")}
    assert parts <= set(CTR_ALLOWED), parts - set(CTR_ALLOWED)


def test_kernels_do_not_need_torchrec():
    """The GPU machines that run the kernel benchmarks have torch and Triton, not TorchRec."""
    for path in sorted((ROOT / "kernels").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("kernel*.py")):
        for line, target in _imports(path):
            assert target.split(".")[0] not in ("torchrec", "fbgemm_gpu"), f"{path.relative_to(ROOT)}:{line}"
