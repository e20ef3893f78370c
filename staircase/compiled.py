"""Which of the hot modules run compiled, and never a compiled build older than its source.

``setup.py`` compiles the simulator's hot path with Cython (``COMPILED``) where a C
compiler is at hand, and writes beside each built module the hash of the sources it
was built from (the ``.py`` and its ``.pxd``, if any). Python would import a built
module before its ``.py`` even after the ``.py`` changed; ``install()`` (run when the
``staircase`` package is imported) puts a finder first on ``sys.meta_path`` that loads
the ``.py`` instead when the build is missing its hash, no longer matches, or
``STAIRCASE_PURE=1`` is set (to profile or debug the Python source). The Python source
is always correct; the build only makes it faster. Rebuild after an edit with
``pip install -e .`` (``make run`` and ``make test`` do it after an edit). All or none: the
compiled modules use each other's C types, so one stale build makes every one of them
run as Python.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

COMPILED = ("staircase.sim.engine", "staircase.sim.simulate", "staircase.driver", "staircase.scheduler", "staircase.policies.base",
            "staircase.policies.fixed", "staircase.policies.adaptive", "staircase.policies.registry",
            "staircase.prompts", "staircase.metrics", "staircase.topology")
PURE_ENV = "STAIRCASE_PURE"


def source_hash(py: Path) -> str:
    """sha256 over a module's ``.py`` and, when there is one, its ``.pxd``."""
    digest = hashlib.sha256(py.read_bytes())
    pxd = py.with_suffix(".pxd")
    if pxd.exists():
        digest.update(pxd.read_bytes())
    return digest.hexdigest()


def _built(py: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        so = py.with_suffix(suffix)
        if so.exists():
            return so
    return None


def state(py: Path) -> str:
    """``compiled``, or why the ``.py`` runs: ``python (no build)``, ``python (build older
    than its source)``, ``python (STAIRCASE_PURE=1)``."""
    so = _built(py)
    if so is None:
        return "python (no build)"
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"python ({PURE_ENV}=1)"
    stamp = Path(str(so) + ".sha256")
    if not stamp.exists() or stamp.read_text().strip() != source_hash(py):
        return "python (build older than its source)"
    return "compiled"


class _CurrentSourceFinder:
    """Finds the modules of ``COMPILED``: the builds when every one is current (they use
    each other's C types), else every ``.py``."""

    def __init__(self):
        self.compiled: bool | None = None  # decided at the first import of one of them

    def find_spec(self, fullname, path, target=None):
        if fullname not in COMPILED:
            return None
        name = fullname.rpartition(".")[2]
        for entry in path if path is not None else sys.path:
            py = Path(entry) / f"{name}.py"
            if py.exists():
                break
        else:
            return None
        if self.compiled is None:  # the project's root: as many folders up as the name has dots
            self.compiled = self._all_current(py.parents[fullname.count(".")])
        return None if self.compiled else importlib.util.spec_from_file_location(fullname, py)

    @staticmethod
    def _all_current(root: Path) -> bool:
        states = {name: state(root.joinpath(*name.split(".")).with_suffix(".py")) for name in COMPILED}
        stale = [name for name, how in states.items() if how.startswith("python (build older")]
        unbuilt = [name for name, how in states.items() if how == "python (no build)"]
        if stale or (unbuilt and len(unbuilt) < len(states)):
            why = f"{', '.join(stale)} changed since compiled" if stale else f"{', '.join(unbuilt)} not compiled"
            warnings.warn(f"{why}: running every compiled module as Python (slower); rebuild with "
                          f"`pip install -e .`", RuntimeWarning, stacklevel=3)
        return all(how == "compiled" for how in states.values())


def install() -> None:
    if not any(isinstance(f, _CurrentSourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CurrentSourceFinder())


def report() -> dict[str, str]:
    """Module -> how it runs now (``compiled`` or ``python (...)``), for the modules imported so far."""
    out = {}
    for name in COMPILED:
        mod = sys.modules.get(name)
        if mod is not None:
            origin = Path(mod.__file__)
            if origin.suffix != ".py":
                out[name] = "compiled"
            else:  # its own build may be current while another one's is missing or stale
                how = state(origin)
                out[name] = "python (another compiled module's build is missing or stale)" if how == "compiled" else how
    return out
