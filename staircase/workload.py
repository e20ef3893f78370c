"""Workloads: when requests arrive and how long their query and answer are.

- ``poisson``: exponential inter-arrival times at ``rate_per_s``.
- ``gamma``: gamma inter-arrival times at ``rate_per_s`` with coefficient of variation
  ``cv`` (cv > 1 is burstier than Poisson).
- ``closed``: ``concurrency`` users; each sends its next request when the last ends.
- ``azure``: replay of the Azure LLM inference trace (conversation service, Nov 2023):
  real arrival times and token counts (ContextTokens -> query tokens, GeneratedTokens ->
  answer tokens). A copy ships in ``staircase/data`` (CC-BY 4.0, Microsoft Azure Public Dataset).
- ``run``: another run's traffic (``trace``): a results folder of ``staircase live``,
  ``serve`` or ``sim`` (its first policy's requests: arrival times, query and answer
  tokens as recorded), or a file of arrival seconds, one per line (lengths: the medians).

Synthetic lengths are log-normal around ``query_tokens`` / ``output_tokens`` medians.
One workload for every command: the simulator, the search and the plan simulate it; the
live runner sends at its arrival times (``arrival_times``), so a live run's traffic is a
workload the plan can size for (``--workload run --trace <live results folder>``).
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

WORKLOAD_KINDS = ("poisson", "gamma", "closed", "azure", "run")
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
    trace: str | None = None  # azure: CSV path (default: the bundled copy); run: a results folder or a file of seconds
    time_scale: float = 1.0  # azure, run: arrival times divided by this (2.0 = twice the load)

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
        if self.kind == "run" and not self.trace:
            raise ConfigError("trace", self.trace, "the run whose traffic this is: a results folder or a file of seconds")

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
    if w.kind == "run":
        return run_requests(w.trace, w.requests, w.time_scale, w.query_tokens, w.output_tokens)
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


def arrival_times(w: Workload, seed: int) -> list[float] | None:
    """When each of the workload's requests is sent (seconds from the first); None for a
    closed loop. The live runner sends at these times: the simulator's arrivals for the
    same workload and seed."""
    if w.closed_loop:
        return None
    return [r.arrival_s for r in make_requests(w, seed)]


def read_run_requests(path: str | Path) -> pd.DataFrame:
    """A run's requests, sorted by arrival (columns arrival_s, query_tokens and
    output_tokens; the last two absent for a file of seconds): a results folder's first
    policy (``traces/*.requests.parquet``), or a file of arrival seconds, one per line."""
    from .trace import read_requests

    path = Path(path)
    if path.is_dir():
        files = sorted((path / "traces").glob("*.requests.parquet"))
        if not files:
            raise ConfigError("arrivals", str(path), "a file of seconds, or a results folder with traces/")
        rows = pd.concat([read_requests(f) for f in files], ignore_index=True)
        first = str(rows["policy"].iloc[0]) if len(rows) else None
        df = rows.loc[rows["policy"] == first, ["arrival_s", "query_tokens", "output_tokens"]]
    elif path.is_file():
        try:
            df = pd.DataFrame({"arrival_s": [float(line) for line in path.read_text().split()]})
        except ValueError:
            raise ConfigError("arrivals", str(path), "a file of numbers of seconds, one per line") from None
    else:
        raise ConfigError("arrivals", str(path), "an existing file of seconds or a results folder")
    if df.empty or not np.isfinite(df["arrival_s"]).all():
        raise ConfigError("arrivals", str(path), "at least one arrival, every one a number of seconds")
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    df["arrival_s"] -= df["arrival_s"].iloc[0]
    return df


def read_arrivals(path: str | Path) -> list[float]:
    """Arrival times in seconds from the first, of a run (``read_run_requests``)."""
    return [float(t) for t in read_run_requests(path)["arrival_s"]]


def run_requests(path: str | Path, n: int | None, time_scale: float, query_tokens: int,
                 output_tokens: int) -> list[Request]:
    """Another run's traffic as requests: its arrival times (divided by ``time_scale``)
    and recorded lengths (a file of seconds: the given medians)."""
    df = read_run_requests(path)
    if n is not None:
        df = df.iloc[:n]
    q = df["query_tokens"] if "query_tokens" in df else [query_tokens] * len(df)
    o = df["output_tokens"] if "output_tokens" in df else [output_tokens] * len(df)
    return [Request(i, float(t) / time_scale, max(1, int(a)), max(1, int(b)))
            for i, (t, a, b) in enumerate(zip(df["arrival_s"], q, o))]
