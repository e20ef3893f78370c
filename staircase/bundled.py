"""Every data file the distribution ships, in one folder (``staircase/data``), asked for by
name: the packages never build a path into another package's folder. Provenance and
licences: ``staircase/data/README.md``."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

FOLDER = Path(__file__).parent / "data"
PROFILES = FOLDER / "profiles"  # simulator profiles: the embedded defaults, by file stem
FILES = {
    "azure-conv-2023": "azure_conv_2023.csv.gz",  # the Azure conversation hour (staircase sim --workload azure)
    "mt-bench": "mt_bench.jsonl",  # the 80 MT-Bench questions (staircase live's prompts)
    "alpaca-eval": "alpaca_eval.json.gz",  # the 805 AlpacaEval 2.0 instructions and reference answers
    "gsm8k-test": "gsm8k_test.jsonl.gz",  # the 1,319 GSM8K test problems (the quality harness)
}


def data_file(name: str) -> Path:
    """The bundled file called ``name`` (a key of ``FILES``)."""
    if name not in FILES:
        raise ConfigError("data file", name, ", ".join(FILES))
    return FOLDER / FILES[name]


def profile_names() -> list[str]:
    """The bundled profiles' names (``default``, ``h100-moa``, ...)."""
    return sorted(p.stem for p in PROFILES.glob("*.json"))


def profile_file(name: str) -> Path | None:
    """The bundled profile called ``name``, or None."""
    path = PROFILES / f"{name}.json"
    return path if path.is_file() else None
