"""The house rules of docs/design.md, checked on the source: import arrows one way, and no
function over 40 lines outside the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the rooms: the core (staircase/ itself) and the subpackages whose folders sit at the top of
# the repository and install as staircase.<room> (staircase/<room> is a symlink to <room>/)
ROOMS = ("sim", "live", "calibration", "search", "plan", "quality")
PACKAGES = ("staircase", *ROOMS)
MAX_FUNCTION_LINES = 40


def _sources(*folders: str):
    """The .py files of these top-level folders, each once (the core's walk skips the rooms'
    symlinks: their files are found under their own folders)."""
    for folder in folders:
        base = ROOT / folder
        yield from sorted(p for p in base.rglob("*.py")
                          if folder != "staircase" or p.relative_to(base).parts[0] not in ROOMS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ROOMS:
        parts.insert(0, "staircase")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(name: str) -> str:
    """The room a module name belongs to: ``staircase.sim.engine`` -> sim, ``staircase.driver``
    -> staircase (the core); a name outside the project -> its top-level package."""
    parts = name.split(".")
    return parts[1] if parts[0] == "staircase" and len(parts) > 1 and parts[1] in ROOMS else parts[0]


def _imports(path: Path) -> set[str]:
    """What a file imports, anywhere in it (functions included), as absolute names: each
    ``from X import y`` gives X and X.y; relative imports resolved from the file's module."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


# package -> packages it must never import
FORBIDDEN = {"staircase": ROOMS,
             "sim": ("live", "calibration", "search", "plan", "quality"),
             "live": ("sim", "calibration", "search", "plan", "quality"),
             "calibration": ("search", "plan", "quality"), "search": ("live", "calibration", "plan", "quality"),
             "plan": ("live", "calibration", "quality"), "quality": ("sim", "calibration", "search", "plan")}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    for path in _sources(package):
        names = _imports(path)
        old = {n for n in names if n.split(".")[0] in ROOMS}
        assert not old, f"{path.relative_to(ROOT)} imports {sorted(old)} (the rooms are staircase.<room>)"
        rooms = {_room(n) for n in names}
        bad = rooms & set(FORBIDDEN.get(package, ()))
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        # no package imports another's CLI module (the core's, the command's frame, is shared)
        other_cli = {n for n in names if n.endswith(".cli") and _room(n) not in (package, "staircase")}
        assert not other_cli, f"{path.relative_to(ROOT)} imports {sorted(other_cli)}"


def test_everything_imports_the_rooms_through_the_one_namespace():
    """Scripts, tests and docs too: ``import sim`` works only from the repository's root, never
    for a user who installed the package."""
    old = []
    for path in _sources("benchmarks", "tests", "docs"):
        names = {n for n in _imports(path) if n.split(".")[0] in ROOMS}
        old += [f"{path.relative_to(ROOT)}: {sorted(names)}"] if names else []
    assert not old, old


def test_the_spec_layer_is_at_the_bottom():
    """``staircase.spec`` (fields declared once: checks and schemas) and the error type it
    raises import nothing of the project above them and no library outside Python's own."""
    import sys

    for module in ("staircase/spec.py", "staircase/errors.py"):
        names = {n for n in _imports(ROOT / module) if n != "__future__"}
        project = {n for n in names if n.split(".")[0] in PACKAGES} - {"staircase.errors", "staircase.errors.ConfigError"}
        outside = {n.split(".")[0] for n in names if n.split(".")[0] not in sys.stdlib_module_names} - set(PACKAGES)
        assert not project and not outside, (module, sorted(project | outside))


def test_no_function_over_40_lines_outside_the_tests():
    long = []
    for path in _sources(*PACKAGES, "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split by job: " + "; ".join(long)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _sources(*PACKAGES)}


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, functions included;
    ``from pkg import name`` counts as pkg, and as pkg.name when that is a module)."""
    modules = _project_modules()
    graph = {}
    for name, path in modules.items():
        out = set()
        for imported in _imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                out.add(imported)
        graph[name] = out
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circles():
    graph = _import_graph()
    assert "staircase.policies.registry" in graph["staircase.policies"]  # the walk sees relative imports
    circle = _cycle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_registry_imports_every_policy_kind():
    graph = _import_graph()
    kinds = {"staircase.policies.fixed", "staircase.policies.adaptive"}
    importers = {m for m, deps in graph.items() if kinds <= deps}
    assert importers == {"staircase.policies.registry"}


def _is_cli_module(path: Path) -> bool:
    return path.name == "cli.py"


def test_no_namespace_outside_cli_modules():
    """Library code takes typed configs or plain values; only a command's cli.py reads
    argparse's Namespace."""
    bad = []
    for path in _sources(*PACKAGES):
        if not _is_cli_module(path) and "Namespace" in path.read_text():
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"argparse.Namespace outside CLI modules: {bad}"


# Each module is imported in a child forked from an interpreter that has imported no project
# module (third-party libraries are loaded once, before the forks, to keep this fast).
_FRESH_IMPORTS = """
import importlib, os, sys, traceback
for lib in ("numpy", "pandas", "scipy.stats", "simpy", "matplotlib", "seaborn"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not any(m.split(".")[0] in {packages} for m in sys.modules)
failed = 0
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            print(module, traceback.format_exc(limit=3), sep="\\n", flush=True)
            os._exit(1)
        os._exit(0)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    """A script whose first import is any module of the project can start (an import
    circle shows here as an ImportError from a partially initialised module)."""
    import subprocess
    import sys

    modules = sorted(m for m in _project_modules() if not m.endswith("__main__"))  # it runs the command
    code = _FRESH_IMPORTS.replace("{packages}", repr(set(PACKAGES)))
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
