"""Prompt sets for live runs: bundled MT-Bench and AlpacaEval copies, or a JSONL file."""

from __future__ import annotations

from pathlib import Path

from staircase.bundled import data_file
from staircase.errors import ConfigError
from staircase.jsonio import read_json, read_jsonl

BUNDLED = ("mt_bench", "alpaca_eval")


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    """Queries from ``mt_bench``, ``alpaca_eval`` or a JSONL file whose lines have a
    ``prompt``, ``instruction``, ``question`` or ``turns`` field."""
    if source == "mt_bench":
        rows = read_jsonl(data_file("mt-bench"), "prompts")
    elif source == "alpaca_eval":
        rows = read_json(data_file("alpaca-eval"), "prompts")
    else:
        if not Path(source).is_file():
            raise ConfigError("prompts", source, f"{', '.join(BUNDLED)} or an existing JSONL file")
        rows = read_jsonl(source, "prompts")
    out = []
    for i, row in enumerate(rows):
        text = None
        if isinstance(row, dict):
            for key in ("prompt", "instruction", "question"):
                if isinstance(row.get(key), str):
                    text = row[key]
                    break
            if text is None and isinstance(row.get("turns"), list) and row["turns"]:
                text = str(row["turns"][0])
        elif isinstance(row, str):
            text = row
        if not text:
            raise ConfigError(f"prompts[{i}]", str(row)[:60], "an object with prompt, instruction, question or turns")
        out.append(text)
    return out[:limit] if limit else out
