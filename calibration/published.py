"""Check database-built GPU engines against published runs nobody here produced.

A published table (CSV, one row per load point) names the run's settings and what it
measured::

    source,url,retrieved,gpu,engine,engine_version,model,db_model,tp,precision,
    isl,osl,concurrency,ttft_ms,tpot_ms,itl_ms,output_tok_s,statistic,notes

``db_model`` is the database's name of the model (``Qwen/Qwen3-32B``); ``concurrency``
is the benchmark client's closed loop (``vllm bench serve --max-concurrency``,
AIPerf/GenAI-Perf ``--concurrency``); fixed input and output lengths (``--ignore-eos``).
A measure left empty is not checked.

Each load point is predicted by the simulator's engine model (``staircase.sim.engine.SimEngine``,
no noise) driven by the same closed loop: ``concurrency`` users, each sending its next
request (``isl`` prompt tokens, no prefix shared, ``osl`` output tokens) when the last
ends. TTFT is the median, TPOT the mean of (E2E - TTFT) / (osl - 1), output tokens/s
over the run. The engine is built from the database for the row's GPU, engine, model,
TP and precision (``staircase.calibration.gpu``), as ``staircase profile`` builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import simpy

from staircase.sim.engine import SimCall, SimEngine
from staircase.sim.profile import parse_profile
from staircase.driver import RequestDriver
from staircase.errors import ConfigError

from .gpu import GPUEngineSpec, build_engine

COLUMNS = ("source", "url", "retrieved", "gpu", "engine", "engine_version", "model", "db_model", "tp", "precision",
           "isl", "osl", "concurrency", "ttft_ms", "tpot_ms", "itl_ms", "output_tok_s", "statistic", "notes")
REQUIRED = ("source", "url", "gpu", "engine", "db_model", "tp", "precision", "isl", "osl", "concurrency")
MEASURES = ("ttft_ms", "tpot_ms", "output_tok_s")
TARGETS = {"ttft_ms": 0.15, "tpot_ms": 0.10, "output_tok_s": 0.10}  # |predicted / measured - 1|


def read_published(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise ConfigError("published", str(path), "an existing CSV file of published runs")
    try:
        df = pd.read_csv(path, comment="#")
    except Exception as err:
        raise ConfigError("published", str(path), f"a CSV file ({type(err).__name__}: {err})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ConfigError("published.columns", missing, "the columns " + ", ".join(COLUMNS))
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    for i, row in df.iterrows():
        for c in ("tp", "isl", "osl", "concurrency"):
            v = row[c]
            if not (isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and v >= 1
                    and float(v).is_integer()):
                raise ConfigError(f"published[{i + 2}].{c}", v, "an integer >= 1")  # +2: header, 1-based
        if int(row["osl"]) < 2:
            raise ConfigError(f"published[{i + 2}].osl", row["osl"], "an integer >= 2 (TPOT needs two tokens)")
        if all(pd.isna(row[m]) for m in MEASURES):
            raise ConfigError(f"published[{i + 2}]", row["source"], f"at least one of {', '.join(MEASURES)}")
    return df


class _Gen:
    __slots__ = ("max_tokens", "boundaries")

    def __init__(self, osl: int):
        self.max_tokens = osl
        self.boundaries = (1, osl)


class _User(RequestDriver):
    """A benchmark client's user: sends a request, waits for its end, sends the next (a
    request driver to the engine, which reports to one; no scheduler behind it)."""

    def __init__(self, bench: "ClosedLoop"):  # noqa: D107 (RequestDriver's own fields stay unset)
        self.bench = bench
        self.first_s = math.nan

    def admitted(self, call, prompt_tokens, cached):
        pass

    def chunk(self, call, tokens, text, first_s, end_s):
        if math.isnan(self.first_s):
            self.first_s = end_s

    def finished(self, call, reason, now):
        self.bench.done(self, call, now)

    def failed(self, call, reason, now):  # no faults are injected here
        raise RuntimeError(reason)


@dataclass
class LoadPoint:
    ttft_ms: float
    tpot_ms: float
    output_tok_s: float
    requests: int


class ClosedLoop:
    """``concurrency`` users on one simulated engine, ``requests`` requests in all."""

    def __init__(self, model, concurrency: int, isl: int, osl: int, requests: int, seed: int = 0):
        self.env = simpy.Environment()
        self.engine = SimEngine(self.env, "bench", model, np.random.default_rng(seed), noise=False)
        self.isl, self.osl, self.left = isl, osl, requests
        self.rows: list[tuple[float, float, float]] = []  # sent, first token, end
        self._n = 0
        for _ in range(min(concurrency, requests)):
            self._send(_User(self))

    def _send(self, user: _User) -> None:
        self.left -= 1
        self._n += 1
        user.first_s = math.nan
        call = SimCall(user, _Gen(self.osl), "bench", 0, ("r", self._n), self.isl, 0, 0, ("s", self._n), self.osl)
        self.engine.submit(call)

    def done(self, user: _User, call, now: float) -> None:
        self.rows.append((call.sent_s, user.first_s, now))
        if self.left > 0:
            self._send(user)

    def run(self) -> LoadPoint:
        self.env.run()
        a = np.array(self.rows)
        ttft = a[:, 1] - a[:, 0]
        tpot = (a[:, 2] - a[:, 1]) / (self.osl - 1)
        span = a[:, 2].max() - a[:, 0].min()
        return LoadPoint(1000 * float(np.median(ttft)), 1000 * float(np.mean(tpot)),
                         len(a) * self.osl / span, len(a))


def predict(model, concurrency: int, isl: int, osl: int, requests: int | None = None) -> LoadPoint:
    n = requests or max(4 * concurrency, 40)
    return ClosedLoop(model, concurrency, isl, osl, n).run()


def engine_for(row, cache: dict, overheads: bool = True):
    key = (row["gpu"], row["engine"], row["db_model"], int(row["tp"]), row["precision"], overheads)
    if key not in cache:
        spec = GPUEngineSpec(row["gpu"], row["engine"], row["db_model"], int(row["tp"]), row["precision"])
        raw = build_engine(spec, overheads=overheads)
        cache[key] = (parse_profile({"schema": "staircase-profile/1", "engines": {"e": raw},
                                     "slots": {"proposers": ["e"], "aggregator": "e"}}).engines["e"], raw)
    return cache[key]


def check_published(table: pd.DataFrame, progress=None, overheads: bool = True) -> pd.DataFrame:
    """Predicted against measured per load point; error columns are predicted / measured - 1."""
    cache: dict = {}
    out = []
    rows = list(table.iterrows())
    for i, row in (progress(rows) if progress else rows):
        model, raw = engine_for(row, cache, overheads)
        p = predict(model, int(row["concurrency"]), int(row["isl"]), int(row["osl"]))
        rec = {c: row[c] for c in COLUMNS}
        rec["kv_cache_tokens"] = raw["kv_cache_tokens"]
        rec["kv_limited"] = int(row["concurrency"]) * (int(row["isl"]) + int(row["osl"])) > raw["kv_cache_tokens"]
        for m in MEASURES:
            pred = getattr(p, m)
            rec[f"pred_{m}"] = pred
            rec[f"err_{m}"] = pred / row[m] - 1 if not pd.isna(row[m]) and row[m] > 0 else np.nan
        out.append(rec)
    return pd.DataFrame(out)


def summarise(result: pd.DataFrame) -> pd.DataFrame:
    """Per source and measure: points, median and max |error|, share within the target."""
    rows = []
    for source, g in result.groupby("source", sort=False):
        for m in MEASURES:
            e = g[f"err_{m}"].dropna().abs()
            if e.empty:
                continue
            rows.append({"source": source, "measure": m, "points": len(e), "median_abs_err_pct": 100 * e.median(),
                         "max_abs_err_pct": 100 * e.max(), "target_pct": 100 * TARGETS[m],
                         "within_target": int((e <= TARGETS[m]).sum())})
    return pd.DataFrame(rows)


def plot_published(result: pd.DataFrame, path: Path) -> Path:
    from staircase.plotting import pyplot, save_figure

    plt, _ = pyplot()

    measures = [m for m in MEASURES if result[m].notna().any()]
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 4))
    axes = np.atleast_1d(axes)
    for ax, m in zip(axes, measures):
        for source, g in result.groupby("source", sort=False):
            ok = g[m].notna()
            ax.scatter(g.loc[ok, m], g.loc[ok, f"pred_{m}"], s=14, label=source)
        lo = np.nanmin(result[[m, f"pred_{m}"]].to_numpy())
        hi = np.nanmax(result[[m, f"pred_{m}"]].to_numpy())
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.fill_between(xs, xs * (1 - TARGETS[m]), xs * (1 + TARGETS[m]), color="0.85", zorder=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {m}")
        ax.set_ylabel(f"predicted {m}")
        ax.set_title(f"{m} (band: target ±{100 * TARGETS[m]:.0f} %)", fontsize=9)
    axes[0].legend(fontsize=6)
    return save_figure(fig, path, dpi=120)
