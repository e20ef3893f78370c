"""Prompt sets for live runs: bundled MT-Bench and AlpacaEval copies, or a JSONL file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from staircase.errors import ConfigError

DATA = Path(__file__).parent / "data"
BUNDLED = ("mt_bench", "alpaca_eval")


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    """Queries from ``mt_bench``, ``alpaca_eval`` or a JSONL file whose lines have a
    ``prompt``, ``instruction``, ``question`` or ``turns`` field."""
    if source == "mt_bench":
        rows = [json.loads(line) for line in (DATA / "mt_bench.jsonl").read_text().splitlines() if line.strip()]
    elif source == "alpaca_eval":
        with gzip.open(DATA / "alpaca_eval.json.gz", "rt") as fh:
            rows = json.load(fh)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError("prompts", source, f"{', '.join(BUNDLED)} or an existing JSONL file")
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"prompts line {i}", line[:60], "one JSON object per line") from None
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
