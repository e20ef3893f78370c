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
