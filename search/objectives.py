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
