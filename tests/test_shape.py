"""The house rules of DESIGN.md, checked on the source: import arrows one way, and no
function over 40 lines outside the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("staircase", "sim", "live", "calibration", "search", "quality")
MAX_FUNCTION_LINES = 40


def _sources(*folders: str):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Modules a file imports (absolute names; relative imports resolved in its package)."""
    package = path.relative_to(ROOT).parts[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}" if base else package
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


# package -> packages it must never import
FORBIDDEN = {"staircase": ("sim", "live", "calibration", "search", "quality"),
             "sim": ("live", "calibration", "search", "quality"), "live": ("sim", "calibration", "search", "quality"),
             "calibration": ("search", "quality"), "search": ("live", "calibration", "quality"),
             "quality": ("sim", "calibration", "search")}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    for path in _sources(package):
        names = _imports(path)
        top = {n.split(".")[0] for n in names}
        bad = top & set(FORBIDDEN.get(package, ()))
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        # no package imports another's CLI module (the core's, the command's frame, is shared)
        other_cli = {n for n in names if n.endswith(".cli") and n.split(".")[0] not in (package, "staircase")}
        assert not other_cli, f"{path.relative_to(ROOT)} imports {sorted(other_cli)}"


def test_no_function_over_40_lines_outside_the_tests():
    long = []
    for path in _sources(*PACKAGES, "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split by job: " + "; ".join(long)
