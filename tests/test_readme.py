"""The README's Python examples run as written (the first with a smaller workload)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has a Python example"
    code = blocks[0].replace("requests=100", "requests=20")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "wait-all" in out and "staircase-prefix-cache-r1" in out and "TTFT p50 s" in out
    for block in blocks[1:]:  # every other example runs as written
        exec(compile(block, "README.md", "exec"), {})
    assert "'kind': 'staircase'" in capsys.readouterr().out
