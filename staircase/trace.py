"""Trace schema shared by the simulator and the live runner.

One row per chunk (``ChunkRow``, ``CHUNK_COLUMNS``) and one per request
(``RequestRow``, ``REQUEST_COLUMNS``): named tuples, built in one place (the request
driver, ``staircase.driver``) whichever runner ran the request.
Times are seconds on the runner's clock; ``arrival_s`` is when the user sent the
request. ``prompt_tokens`` and ``cached_tokens`` sit on the first chunk row of each
call (zero on the others), so their sums over rows are per-call totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, get_type_hints

import pandas as pd

from .errors import ConfigError


class ChunkRow(NamedTuple):
    """One chunk of one call, as both runners record it (``Recorder``)."""

    request_id: int
    policy: str
    node: str
    role: str
    stage: int
    engine: str
    call: int
    chunk_index: int
    tokens: int
    prompt_tokens: int  # on the first chunk of a call, 0 on the others
    cached_tokens: int  # of which served from a prefix cache
    sent_s: float  # when the call was sent (first chunk of a call) or the previous chunk ended
    first_token_s: float
    end_s: float
    user_visible: bool
    text: str | None  # the chunk's text (live); None in the simulator


class RequestRow(NamedTuple):
    """One request, as both runners record it."""

    request_id: int
    policy: str
    arrival_s: float
    query_tokens: int
    outcome: str  # "ok" or "error"
    error: str
    lost: str  # "node: reason; ..." for inputs lost on the way
    ttft_s: float
    e2e_s: float
    tpot_s: float
    output_tokens: int
    output_tokens_per_s: float
    longest_stall_s: float
    stalls_over_threshold: int
    calls: int
    prompt_tokens: int  # over every call of the request
    cached_tokens: int  # of which served from a prefix cache
    context_tokens: float  # upstream (proposer) output tokens the final node's first call reads: what its first token answers from
    prompt_id: str | None  # which prompt of which set (live: "mt_bench/3"); None when synthetic
    answer_text: str | None  # the final answer (live); None in the simulator


_DTYPES = {int: "int64", float: "float64", str: "object", bool: "bool"}


def _columns(row: type) -> dict[str, str]:
    return {name: _DTYPES.get(t, "object") for name, t in get_type_hints(row).items()}


CHUNK_COLUMNS = _columns(ChunkRow)
REQUEST_COLUMNS = _columns(RequestRow)
# columns traces written before they existed lack; readers fill them with None (numbers: NaN)
OPTIONAL_COLUMNS = ("text", "prompt_id", "answer_text", "context_tokens")


def frame(rows: list, columns: dict[str, str]) -> pd.DataFrame:
    """A typed DataFrame from a list of tuples (or dicts) in ``columns`` order."""
    df = pd.DataFrame.from_records(rows, columns=list(columns)) if rows else pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in columns.items()})
    return df.astype(columns)


def check_columns(df: pd.DataFrame, columns: dict[str, str] | list[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns and c not in OPTIONAL_COLUMNS]
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
    return _with_optional(df, REQUEST_COLUMNS)


def read_chunks(path: Path | str) -> pd.DataFrame:
    df = _read(path)
    check_columns(df, CHUNK_COLUMNS, f"trace {path}")
    return _with_optional(df, CHUNK_COLUMNS)


def _with_optional(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    for c in OPTIONAL_COLUMNS:
        if c in columns and c not in df.columns:
            df[c] = float("nan") if columns[c] == "float64" else None
    return df


def _read(path: Path | str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("trace", str(path), "an existing parquet file")
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise ConfigError("trace", str(path), f"a readable parquet file ({type(err).__name__})") from None
