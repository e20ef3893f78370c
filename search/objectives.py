"""What a search optimises: named metrics of a simulated run, each with its direction,
and constraints on them (``ttft_p90<=2``, ``context_p50>=64``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from staircase.errors import ConfigError

# name -> (key in staircase.metrics.summarize, direction, what it is)
METRICS = {
    "ttft_p50": ("ttft_p50_s", "minimize", "time to first token, median (s)"),
    "ttft_p90": ("ttft_p90_s", "minimize", "time to first token, 90th percentile (s)"),
    "e2e_p50": ("e2e_p50_s", "minimize", "end-to-end latency, median (s)"),
    "stall_p50": ("longest_stall_p50_s", "minimize", "longest gap after the first token, median (s)"),
    "stall_p90": ("longest_stall_p90_s", "minimize", "longest gap after the first token, 90th percentile (s)"),
    "prompt_tokens": ("prompt_tokens_mean", "minimize", "prompt tokens per request (all calls)"),
    "prefilled": ("prefilled_tokens_mean", "minimize", "prompt tokens computed (not cached) per request: cost"),
    "context_p50": ("context_tokens_p50", "maximize",
                    "input tokens the final node's first token is written from, median (a quality proxy)"),
    "errors": ("errors", "minimize", "failed requests"),
    "quality": ("quality_predicted", "maximize",
                "quality predicted at the run's context_p50 from a `staircase quality` table (--quality-table)"),
}
DEFAULT_OBJECTIVES = ("ttft_p90", "stall_p50", "e2e_p50", "prefilled")
_CONSTRAINT = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


def check_objectives(names) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError("objectives", names, ", ".join(METRICS))
    for n in names:
        if n not in METRICS:
            raise ConfigError("objectives", n, ", ".join(METRICS))
    if len(set(names)) != len(names):
        raise ConfigError("objectives", names, "each metric once")
    return names


def directions(names) -> list[str]:
    return [METRICS[n][1] for n in names]


def value(metrics: dict, name: str) -> float:
    v = metrics.get(METRICS[name][0], math.nan)
    return float(v) if v is not None else math.nan


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # "<=" or ">="
    bound: float

    @classmethod
    def parse(cls, text: str, context_limit: float | None = None) -> "Constraint":
        """From ``metric<=bound`` / ``metric>=bound``; a bound no run can meet is an error."""
        m = _CONSTRAINT.match(text)
        if not m:
            raise ConfigError("constraint", text, "METRIC<=BOUND or METRIC>=BOUND, e.g. ttft_p90<=2 or context_p50>=64")
        metric, op, bound = m.group(1), m.group(2), float(m.group(3))
        if metric not in METRICS:
            raise ConfigError("constraint", metric, ", ".join(METRICS))
        if not math.isfinite(bound) or (op == "<=" and bound < 0) or (op == "<=" and bound == 0 and metric != "errors"):
            raise ConfigError("constraint", text, f"a bound some run can meet ({metric} is >= 0)")
        if metric == "context_p50" and op == ">=" and context_limit is not None and bound > context_limit:
            raise ConfigError("constraint", text, f"context_p50 >= at most {context_limit:g} "
                              "(the final node's inputs x max tokens)")
        return cls(metric, op, bound)

    def violation(self, metrics: dict) -> float:
        """<= 0 when met (optuna's convention), else by how much it is missed."""
        v = value(metrics, self.metric)
        if math.isnan(v):
            return math.inf
        return v - self.bound if self.op == "<=" else self.bound - v

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


@dataclass(frozen=True)
class QualityCurve:
    """Measured quality against the context the final node's first token is written
    from: the rows of one metric of a ``staircase quality`` table (``quality_table.csv``:
    ``context_tokens_p50``, ``mean``), interpolated linearly and held flat beyond its
    ends. It turns a simulated run's ``context_tokens_p50`` into ``quality_predicted``."""

    metric: str
    contexts: tuple[float, ...]
    means: tuple[float, ...]
    source: str = ""

    @classmethod
    def from_table(cls, spec: str) -> "QualityCurve":
        """From ``FILE`` or ``FILE:METRIC`` (default metric: agreement)."""
        import pandas as pd

        path, _, metric = spec.partition(":") if not spec.endswith(".csv") else (spec, "", "")
        metric = metric or "agreement"
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError) as err:
            raise ConfigError("quality-table", spec, f"a readable quality_table.csv ({type(err).__name__})") from None
        if not {"metric", "context_tokens_p50", "mean"} <= set(table.columns):
            raise ConfigError("quality-table", spec, "a quality_table.csv of `staircase quality` (metric, "
                              "context_tokens_p50, mean columns)")
        rows = table[table["metric"] == metric].dropna(subset=["context_tokens_p50", "mean"])
        points = rows.groupby("context_tokens_p50")["mean"].mean().sort_index()
        if points.empty:
            raise ConfigError("quality-table metric", metric, ", ".join(sorted(table["metric"].dropna().unique())))
        return cls(metric, tuple(map(float, points.index)), tuple(map(float, points.to_numpy())), spec)

    def __call__(self, context: float) -> float:
        import numpy as np

        return float(np.interp(context, self.contexts, self.means)) if not math.isnan(context) else math.nan

    def augment(self, metrics: dict) -> dict:
        """``metrics`` with ``quality_predicted`` (from its ``context_tokens_p50``)."""
        return {**metrics, "quality_predicted": self(float(metrics.get("context_tokens_p50", math.nan) or math.nan))}

    def __str__(self) -> str:
        return f"{self.source} ({self.metric}: " + ", ".join(f"{c:g}->{m:.2f}" for c, m in zip(self.contexts, self.means)) + ")"


# family -> (request column, what it is); an SLO on a family holds for a share of requests
SLO_FAMILIES = {"ttft": ("ttft_s", "time to first token (s)"), "e2e": ("e2e_s", "end-to-end latency (s)"),
                "stall": ("longest_stall_s", "longest gap after the first token (s)"),
                "tpot": ("tpot_s", "time per output token after the first (s)")}
_SLO_PCT = re.compile(r"^\s*([a-z0-9]+)_p(\d{1,2}(?:\.\d+)?)\s*<=\s*([-+0-9.eE]+)\s*$")
_SLO_AT = re.compile(r"^\s*([a-z0-9]+)\s*<=\s*([-+0-9.eE]+)\s*@\s*([0-9.]+)\s*(%?)\s*$")
SLO_HELP = ("FAMILY_pQ<=SECONDS (e.g. ttft_p90<=2: 90 %% of requests with TTFT <= 2 s) or FAMILY<=SECONDS@SHARE "
            "(ttft<=2@90%%); families: " + ", ".join(SLO_FAMILIES))


@dataclass(frozen=True)
class SLO:
    """A latency target with an attainment: at least ``share`` of all requests (failed
    ones count as misses) with ``family`` <= ``bound`` seconds. ``ttft_p90<=2`` and
    ``ttft<=2@90%`` are the same SLO. A search takes it as a constraint (met when the
    evaluation's ``attainment:<slo>`` reaches the share)."""

    family: str
    bound: float
    share: float

    @classmethod
    def parse(cls, text: str) -> "SLO":
        """From ``ttft_p90<=2`` or ``ttft<=2@90%`` (``@0.9``); an SLO no run can meet is an error."""
        m, at = _SLO_PCT.match(text), _SLO_AT.match(text)
        if not (m or at):
            raise ConfigError("slo", text, SLO_HELP.replace("%%", "%"))
        if m:
            family, bound, share = m.group(1), float(m.group(3)), float(m.group(2)) / 100
        else:
            family, bound = at.group(1), float(at.group(2))
            share = float(at.group(3)) / (100 if at.group(4) or float(at.group(3)) > 1 else 1)
        if family not in SLO_FAMILIES:
            raise ConfigError("slo", family, ", ".join(SLO_FAMILIES))
        if not (math.isfinite(bound) and bound > 0):
            raise ConfigError("slo", text, "a bound in seconds > 0")
        if not 0 < share <= 1:
            raise ConfigError("slo", text, "a share of requests in (0, 100 %]")
        return cls(family, bound, share)

    @property
    def metric(self) -> str:
        return f"attainment:{self}"

    def attainment(self, requests, total: int | None = None) -> float:
        """The share of ``total`` requests (default: the rows of ``requests``, a trace's
        request frame; requests without a row count as misses) that meet the bound."""
        total = len(requests) if total is None else total
        if not total:
            return 0.0
        vals = requests[SLO_FAMILIES[self.family][0]].where(requests["outcome"] == "ok")
        return float((vals <= self.bound).sum() / total)

    def missed_in_flight(self, now: float, driver) -> bool:
        """A request still running has missed this SLO already (its first token, or its
        end, is later than the bound whatever happens next); stalls can not be told yet."""
        if self.family == "ttft":
            return not driver.user and now - driver.arrival_s > self.bound
        return self.family == "e2e" and now - driver.arrival_s > self.bound

    def violation(self, metrics: dict) -> float:
        """<= 0 when met (a search constraint), else the share of requests missing."""
        got = metrics.get(self.metric)
        return math.inf if got is None or math.isnan(got) else self.share - got

    def __str__(self) -> str:
        pct = f"{self.share * 100:g}"
        return f"{self.family}_p{pct}<={self.bound:g}" if "." not in pct else f"{self.family}<={self.bound:g}@{pct}%"


def slo_watch(slos, total: int):
    """A simulation watch (``staircase.sim.simulate.simulate(watch=...)``) that stops a run once some
    SLO has more misses (finished requests over the bound or failed, and running ones
    already past it) than its share allows of ``total`` requests: its attainment can no
    longer reach the share, and the rest of the run (a growing queue, the slowest part to
    simulate) would not change the verdict."""
    allowed = [math.floor((1 - s.share) * total + 1e-9) for s in slos]
    columns = [SLO_FAMILIES[s.family][0] for s in slos]
    missed, seen = [0] * len(slos), [0]

    def watch(now: float, in_flight, finished) -> bool:
        for row in finished[seen[0]:]:
            for i, (s, col) in enumerate(zip(slos, columns)):
                if row.outcome != "ok" or not getattr(row, col) <= s.bound:
                    missed[i] += 1
        seen[0] = len(finished)
        for i, s in enumerate(slos):
            if missed[i] > allowed[i] or \
                    missed[i] + sum(1 for d in in_flight.values() if s.missed_in_flight(now, d)) > allowed[i]:
                return True
        return False
    return watch
