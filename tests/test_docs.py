"""The manual: it builds strictly, its command line reference is current, and every shell
and Python block of the README and the guides runs (at small sizes where a marker says
so) or carries a marker saying why it cannot (docs/guides/testing.md, "Examples are tests")."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_LIMIT_BYTES = 12_000
FENCE = re.compile(r"(?:<!-- example: (?P<marker>[^\n]*?) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)
REPLACE = re.compile(r'replace "([^"]*)" => "([^"]*)"')
EXPECT = re.compile(r'expect "([^"]*)"')
# figure "ROW | COLUMN | VALUE": the printed table's cell in the row that starts with ROW, under the header
# COLUMN, is VALUE within 2 % (figures stated in a page are checked against what the command prints)
FIGURE = re.compile(r'figure "([^"|]+)\|([^"|]+)\|([^"]+)"')
FIGURE_TOLERANCE = 0.02
VENV_BIN = Path(sys.prefix) / "bin"


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    lang: str
    code: str
    marker: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        found = re.match(r"skip \((.+)\)$", self.marker.strip())
        return found.group(1) if found else None

    def runnable_code(self) -> str:
        code = self.code
        for old, new in REPLACE.findall(self.marker):
            assert old in code, f"{self.id}: the marker replaces {old!r}, which the block does not hold"
            code = code.replace(old, new)
        return code

    @property
    def expected(self) -> list[str]:
        return EXPECT.findall(self.marker)

    @property
    def figures(self) -> list[tuple[str, str, float]]:
        return [(row.strip(), col.strip(), float(value.strip().rstrip("%s ").strip()))
                for row, col, value in FIGURE.findall(self.marker)]


def table_cell(out: str, row: str, column: str) -> float:
    """A number of a printed table (columns apart by two or more spaces, a dashed rule under
    the header): the cell under ``column`` in the first row that starts with ``row``."""
    lines = out.splitlines()
    for i, line in enumerate(lines[:-1]):
        header = re.split(r"\s{2,}", line.strip())
        if column in header and set(lines[i + 1].replace(" ", "")) == {"-"}:
            for cells in (re.split(r"\s{2,}", r.strip()) for r in lines[i + 2:]):
                if cells and cells[0] == row and len(cells) == len(header):
                    return float(cells[header.index(column)].rstrip("% ").strip())
    raise AssertionError(f"no table with column {column!r} and row {row!r} in:\n{out[-3000:]}")


def _examples() -> list[Example]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            out.append(Example(page, text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"], m["marker"] or ""))
    return out


EXAMPLES = _examples()


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_bytes()) <= README_LIMIT_BYTES
    assert len(EXAMPLES) > 20 and {e.page.name for e in EXAMPLES} >= {"README.md", "simulate.md", "search.md"}


def test_every_marker_is_understood():
    for e in EXAMPLES:
        if e.marker:
            known = (e.skip_reason is not None or REPLACE.search(e.marker) or EXPECT.search(e.marker)
                     or FIGURE.search(e.marker))
            assert known, f"{e.id}: unknown example marker {e.marker!r}"


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_line_reference_is_current(monkeypatch):
    gen = _gen_cli()
    monkeypatch.setenv("COLUMNS", "100")
    assert gen.PAGE.read_text() == gen.render(), "docs/reference/cli.md is stale: run python docs/gen_cli.py"


def test_the_file_schemas_are_current():
    spec = importlib.util.spec_from_file_location("gen_schemas", ROOT / "docs" / "gen_schemas.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path, text in gen.render().items():
        assert path.read_text() == text, f"{path} is stale: run python docs/gen_schemas.py"
    import jsonschema

    for _title, _note, schema in gen.schemas().values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_reference_lists_every_command_and_policy_name():
    from staircase.policies import POLICY_KINDS, POLICY_NAMES

    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for command in ("sim", "live", "serve", "search", "plan", "calibrate", "validate", "quality", "model"):
        assert f"## staircase {command}\n" in page
    for name in [*POLICY_NAMES, *POLICY_KINDS]:
        assert f"| `{name}` |" in page


def test_the_manual_builds_strictly(tmp_path):
    mkdocs = VENV_BIN / "mkdocs"
    assert mkdocs.exists(), "mkdocs is not installed: the docs extra (make test installs it)"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "make_policies" in api and "open_engines" in api  # mkdocstrings rendered the docstrings


def _scratch(tmp_path: Path) -> Path:
    """A folder that sees the repository's folders (results/ of its own) and the environment
    the tests run in as .venv."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", "results", ".git"):
            (work / entry.name).symlink_to(entry)
    (work / ".venv").symlink_to(Path(sys.prefix))
    return work


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs(example: Example, tmp_path, monkeypatch, capsys):
    if example.skip_reason is not None:
        pytest.skip(example.skip_reason)
    if not (VENV_BIN / "staircase").exists():
        pytest.fail("the examples run the installed `staircase` command (make test installs it)")
    work = _scratch(tmp_path)
    code = example.runnable_code()
    if example.lang == "bash":
        env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", NO_MKDOCS_2_WARNING="1")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, capture_output=True, text=True,
                              timeout=900, env=env)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{example.id} failed:\n{out[-4000:]}"
    else:
        monkeypatch.chdir(work)
        exec(compile(code, example.id, "exec"), {"__name__": "__example__"})
        out = capsys.readouterr().out
    for text in example.expected:
        assert text in out, f"{example.id}: {text!r} not in its output:\n{out[-3000:]}"
    for row, column, value in example.figures:
        got = table_cell(out, row, column)
        assert abs(got - value) <= FIGURE_TOLERANCE * abs(value) + 1e-9, \
            f"{example.id}: {row} {column} is {got}, the page says {value}: rerun and update the page"


def test_the_front_page_states_the_figures_its_example_checks():
    """The README's headline figures are those getting-started's `staircase sim` example
    checks (figure markers), so a change that moves them fails there."""
    example = next(e for e in EXAMPLES if e.page.name == "getting-started.md" and e.figures)
    readme = (ROOT / "README.md").read_text()
    figures = {(row, col): v for row, col, v in example.figures}
    for row, col, text in (("wait-all", "TTFT p50 s", "9.56 s"), ("staircase-prefix-cache-r1", "TTFT p50 s", "1.11 s"),
                           ("staircase-prefix-cache-r1", "TTFT cut vs wait-all", "88.4 %"),
                           ("single", "TTFT p50 s", "0.20 s")):
        assert text in readme, f"README.md no longer states {text}"
        stated = float(text.split()[0])
        assert abs(figures[(row, col)] - stated) <= 0.006 * max(1.0, stated), (row, col, figures[(row, col)], stated)


def test_a_figure_marker_reads_the_printed_table():
    out = "policy  TTFT p50 s  TTFT cut\n------  ---------  --------\nwait-all  9.562  0.0 %\nsingle  0.200  97.9 %\n"
    assert table_cell(out, "single", "TTFT cut") == 97.9 and table_cell(out, "wait-all", "TTFT p50 s") == 9.562
    with pytest.raises(AssertionError, match="no table"):
        table_cell(out, "staircase", "TTFT p50 s")


def test_every_json_block_parses():
    import json

    blocks = [(page, m.group(1)) for page in PAGES for m in re.finditer(r"```json\n(.*?)```", page.read_text(), re.S)]
    assert blocks
    for page, code in blocks:
        json.loads(code)  # a config a reader copies must be valid JSON
