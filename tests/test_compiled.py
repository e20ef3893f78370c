"""The compiled hot path (setup.py, staircase/compiled.py): the same results as the
Python source, and never a build older than its source."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from staircase import compiled

ROOT = Path(__file__).resolve().parents[1]

# every policy kind on the simulator, with faults and sessions: what the compiled modules carry
RUN = """
import json, sys
from staircase.sim.profile import load_profile
from staircase.sim.simulate import simulate
from staircase.workload import Workload
from staircase import compiled
from staircase.policies import policy_from_dict
from staircase.topology import moa
kinds = [{"kind": "staircase", "redundancy": 2}, {"kind": "staircase", "layout": "session"}, {"kind": "wait-all"},
         {"kind": "staircase-straggler"}, {"kind": "staircase-smooth"}, {"kind": "staircase-load"},
         {"kind": "staircase-ttft"}, {"kind": "staircase-deadline"}]
out = {}
for raw in kinds:
    for faults in (None, {"L0.p1": 40}):
        p = policy_from_dict(raw)
        t = simulate(moa(4), p, Workload("poisson", requests=60, rate_per_s=2.0), load_profile("illustrative-gpu"),
                     seed=3, faults=faults, progress=False)
        out[f"{p.name} {faults}"] = [t.requests.to_json(), t.chunks.to_json()]
json.dump({"report": compiled.report(), "traces": out}, sys.stdout)
"""


def _run(env: dict, cwd: Path = ROOT) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _built() -> list[str]:
    return [name for name in compiled.COMPILED
            if compiled.state(ROOT.joinpath(*name.split(".")).with_suffix(".py")) == "compiled"]


def test_compiled_modules_give_the_python_sources_results():
    if not _built():
        pytest.skip("no compiled build here (no C compiler when it was installed): the Python source runs")
    fast = _run(os.environ | {compiled.PURE_ENV: "0"})
    slow = _run(os.environ | {compiled.PURE_ENV: "1"})
    assert set(fast["report"].values()) == {"compiled"}, fast["report"]
    assert set(slow["report"].values()) == {"python (STAIRCASE_PURE=1)"}, slow["report"]
    assert fast["traces"].keys() == slow["traces"].keys()
    for key, trace in fast["traces"].items():
        assert trace == slow["traces"][key], key


def test_a_build_older_than_its_source_is_not_loaded(tmp_path):
    """A copy of the package (its rooms' symlinks copied as folders) with one module edited
    after its build: every compiled module runs from its .py (they share C types), with a
    warning naming the edited one."""
    if set(_built()) != set(compiled.COMPILED):
        pytest.skip("no complete compiled build here: nothing can be stale")
    shutil.copytree(ROOT / "staircase", tmp_path / "staircase", ignore=shutil.ignore_patterns("__pycache__", "data"))
    engine = tmp_path / "staircase" / "sim" / "engine.py"
    engine.write_text(engine.read_text() + "\n# edited after the build\n")
    code = ("import warnings; warnings.simplefilter('always'); import staircase.sim.simulate, staircase.driver; "
            "from staircase import compiled; print(staircase.sim.engine.__file__); print(staircase.driver.__file__); "
            "print(compiled.report())")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {compiled.PURE_ENV: "0"}, timeout=120)
    assert done.returncode == 0, done.stderr
    engine_file, driver_file, report = done.stdout.splitlines()
    assert Path(engine_file) == engine
    assert Path(driver_file) == tmp_path / "staircase" / "driver.py"
    assert "'staircase.sim.engine': 'python (build older than its source)'" in report
    assert "'staircase.driver': \"python (another compiled module's build is missing or stale)\"" in report
    assert "staircase.sim.engine changed since compiled" in done.stderr
    # and the untouched copy runs compiled
    engine.write_text((ROOT / "sim" / "engine.py").read_text())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {compiled.PURE_ENV: "0"}, timeout=120)
    assert done.returncode == 0 and "changed since compiled" not in done.stderr, done.stderr
    assert set(ast.literal_eval(done.stdout.splitlines()[2]).values()) == {"compiled"}


def test_a_build_without_its_hash_is_not_trusted(tmp_path):
    py = tmp_path / "m.py"
    py.write_text("x = 1\n")
    assert compiled.state(py) == "python (no build)"
    so = py.with_suffix(compiled.importlib.machinery.EXTENSION_SUFFIXES[0])
    so.write_bytes(b"")
    assert compiled.state(py) == "python (build older than its source)"
    Path(str(so) + ".sha256").write_text(compiled.source_hash(py))
    assert compiled.state(py) == "compiled"
    py.with_suffix(".pxd").write_text("cdef int y\n")  # the .pxd counts as source
    assert compiled.state(py) == "python (build older than its source)"
