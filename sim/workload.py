"""Workloads: when requests arrive and how long their query and answer are.

- ``poisson``: exponential inter-arrival times at ``rate_per_s``.
- ``gamma``: gamma inter-arrival times at ``rate_per_s`` with coefficient of variation
  ``cv`` (cv > 1 is burstier than Poisson).
- ``closed``: ``concurrency`` users; each sends its next request when the last ends.
- ``azure``: replay of the Azure LLM inference trace (conversation service, Nov 2023):
  real arrival times and token counts (ContextTokens -> query tokens, GeneratedTokens ->
  answer tokens). A copy ships in ``staircase/data`` (CC-BY 4.0, Microsoft Azure Public Dataset).

Synthetic lengths are log-normal around ``query_tokens`` / ``output_tokens`` medians.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from staircase.bundled import data_file
from staircase.errors import ConfigError

WORKLOAD_KINDS = ("poisson", "gamma", "closed", "azure")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BUNDLED_AZURE = data_file("azure-conv-2023")


@dataclass(frozen=True)
class Request:
    request_id: int
    arrival_s: float  # NaN for closed-loop requests (set when a user frees up)
    query_tokens: int
    output_tokens: int
    text: str | None = None


@dataclass(frozen=True)
class Workload:
    kind: str = "poisson"
    requests: int = 200
    rate_per_s: float = 1.0
    cv: float = 2.0
    concurrency: int = 8
    query_tokens: int = 200  # median of the synthetic log-normal
    output_tokens: int = 300
    length_sigma: float = 0.5
    trace: str | None = None  # azure: CSV path (default: the bundled copy)
    time_scale: float = 1.0  # azure: arrival times divided by this (2.0 = twice the load)

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ConfigError("workload", self.kind, ", ".join(WORKLOAD_KINDS))
        _check_int("requests", self.requests, 1)
        _check_int("concurrency", self.concurrency, 1)
        _check_int("query_tokens", self.query_tokens, 1)
        _check_int("output_tokens", self.output_tokens, 1)
        for name in ("rate_per_s", "cv", "time_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(name, v, "a positive number")
        if not (self.length_sigma >= 0):
            raise ConfigError("length_sigma", self.length_sigma, "a number >= 0")

    @property
    def closed_loop(self) -> bool:
        return self.kind == "closed"

    def describe(self) -> dict:
        return asdict(self)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")


def make_requests(w: Workload, seed: int) -> list[Request]:
    """The workload's requests; a pure function of (workload, seed)."""
    rng = np.random.default_rng([seed, 0x57A1])
    if w.kind == "azure":
        return azure_requests(w.trace, w.requests, w.time_scale)
    n = w.requests
    q = _lognormal(rng, w.query_tokens, w.length_sigma, n)
    o = _lognormal(rng, w.output_tokens, w.length_sigma, n)
    if w.kind == "poisson":
        gaps = rng.exponential(1.0 / w.rate_per_s, n)
    elif w.kind == "gamma":
        shape = 1.0 / (w.cv * w.cv)
        gaps = rng.gamma(shape, 1.0 / (w.rate_per_s * shape), n)
    else:
        gaps = np.full(n, np.nan)
    arrivals = np.cumsum(gaps) - (gaps[0] if n else 0.0)
    return [Request(i, float(arrivals[i]), int(q[i]), int(o[i])) for i in range(n)]


def _lognormal(rng: np.random.Generator, median: int, sigma: float, n: int) -> np.ndarray:
    x = median * np.exp(sigma * rng.standard_normal(n))
    return np.clip(np.rint(x), 1, 32768).astype(np.int64)


def read_azure(path: str | Path | None = None) -> pd.DataFrame:
    """The Azure trace as a DataFrame; checks columns and values."""
    path = Path(path) if path is not None else BUNDLED_AZURE
    if not path.is_file():
        raise ConfigError("trace", str(path), "an existing CSV file with columns " + ", ".join(AZURE_COLUMNS))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            df = pd.read_csv(fh)
    except Exception as err:
        raise ConfigError("trace", str(path), f"a readable CSV file ({type(err).__name__})") from None
    missing = [c for c in AZURE_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError("trace columns", list(df.columns), f"must include {', '.join(missing)} ({path})")
    try:
        ts = pd.to_datetime(df["TIMESTAMP"], format="mixed")
    except (ValueError, TypeError):
        raise ConfigError("trace.TIMESTAMP", str(df["TIMESTAMP"].iloc[0]), "timestamps like 2023-11-16 18:15:46.68") from None
    for col in AZURE_COLUMNS[1:]:
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna() | (vals < 0)
        if bad.any():
            raise ConfigError(f"trace.{col}", df[col][bad].iloc[0], "non-negative integers")
        df[col] = vals.astype(np.int64)
    df["arrival_s"] = (ts - ts.min()).dt.total_seconds()
    return df.sort_values("arrival_s", kind="stable").reset_index(drop=True)


def azure_requests(path: str | Path | None, n: int | None, time_scale: float = 1.0) -> list[Request]:
    df = read_azure(path)
    if n is not None:
        df = df.iloc[:n]
    return [Request(i, float(t) / time_scale, max(1, int(c)), max(1, int(g)))
            for i, (t, c, g) in enumerate(zip(df["arrival_s"], df["ContextTokens"], df["GeneratedTokens"]))]
