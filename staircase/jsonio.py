"""The one reader of the project's JSON and JSONL files, with one error shape: a file that
is missing, is not valid JSON or not UTF-8 raises a ``ConfigError`` naming the field, the
path and what is allowed (the line, for JSONL)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _text(path: Path, field: str, allowed: str) -> str:
    if not path.is_file():
        raise ConfigError(field, str(path), f"an existing {allowed}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(field, str(path), f"a UTF-8 {allowed} ({type(err).__name__})") from None


def parse_json(text: str, field: str, value: str | None = None) -> Any:
    """``text`` as JSON; ``value`` names it in the error (default: the text itself)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(field, text if value is None else value, f"valid JSON ({err.msg}, line {err.lineno})") from None


def read_json(path: str | Path, field: str, allowed: str = "JSON file") -> Any:
    """A JSON file (``.gz``: gzip-compressed) as Python values."""
    path = Path(path)
    return parse_json(_text(path, field, allowed), field, str(path))


def read_jsonl(path: str | Path, field: str, allowed: str = "JSONL file", skip_bad: bool = False) -> list[Any]:
    """A JSONL file's values, one per non-blank line. A bad line raises naming
    ``"{field} line N"``; with ``skip_bad`` it is left out (a line cut short by a kill)."""
    path = Path(path)
    out = []
    for i, line in enumerate(_text(path, field, allowed).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if not skip_bad:
                raise ConfigError(f"{field} line {i}", line[:60], "one JSON object per line") from None
    return out
