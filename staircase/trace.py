"""Trace schema shared by the simulator and the live runner.

One row per chunk (``CHUNK_COLUMNS``) and one per request (``REQUEST_COLUMNS``).
Times are seconds on the runner's clock; ``arrival_s`` is when the user sent the
request. ``prompt_tokens`` and ``cached_tokens`` sit on the first chunk row of each
call (zero on the others), so their sums over rows are per-call totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import ConfigError

CHUNK_COLUMNS = {
    "request_id": "int64",
    "policy": "object",
    "node": "object",
    "role": "object",
    "stage": "int64",
    "engine": "object",
    "call": "int64",
    "chunk_index": "int64",
    "tokens": "int64",
    "prompt_tokens": "int64",
    "cached_tokens": "int64",
    "sent_s": "float64",  # when the call was sent (first chunk of a call) or the previous chunk ended
    "first_token_s": "float64",
    "end_s": "float64",
    "user_visible": "bool",
}

REQUEST_COLUMNS = {
    "request_id": "int64",
    "policy": "object",
    "arrival_s": "float64",
    "query_tokens": "int64",
    "outcome": "object",  # "ok" or "error"
    "error": "object",
    "lost": "object",  # "node: reason; ..." for inputs lost on the way
    "ttft_s": "float64",
    "e2e_s": "float64",
    "tpot_s": "float64",
    "output_tokens": "int64",
    "output_tokens_per_s": "float64",
    "longest_stall_s": "float64",
    "stalls_over_threshold": "int64",
    "calls": "int64",
    "prompt_tokens": "int64",  # over every call of the request
    "cached_tokens": "int64",  # of which served from a prefix cache
}


def frame(rows: list, columns: dict[str, str]) -> pd.DataFrame:
    """A typed DataFrame from a list of tuples (or dicts) in ``columns`` order."""
    df = pd.DataFrame.from_records(rows, columns=list(columns)) if rows else pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in columns.items()})
    return df.astype(columns)


def check_columns(df: pd.DataFrame, columns: dict[str, str] | list[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{source} columns", sorted(df.columns), f"must include {', '.join(missing)}")


@dataclass
class Trace:
    """The trace of one policy's run. ``chunks`` is None in summary-only mode."""

    policy: str
    requests: pd.DataFrame
    chunks: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        safe = self.policy.replace("/", "_")
        paths = [folder / f"{safe}.requests.parquet"]
        self.requests.to_parquet(paths[0], index=False)
        if self.chunks is not None:
            paths.append(folder / f"{safe}.chunks.parquet")
            self.chunks.to_parquet(paths[1], index=False)
        return paths


def read_requests(path: Path | str) -> pd.DataFrame:
    df = _read(path)
    check_columns(df, REQUEST_COLUMNS, f"trace {path}")
    return df


def read_chunks(path: Path | str) -> pd.DataFrame:
    df = _read(path)
    check_columns(df, CHUNK_COLUMNS, f"trace {path}")
    return df


def _read(path: Path | str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("trace", str(path), "an existing parquet file")
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise ConfigError("trace", str(path), f"a readable parquet file ({type(err).__name__})") from None
