"""Metrics with vLLM's benchmark names: TTFT, TPOT, ITL, E2E, output tokens/s, prompt
and cached tokens, plus streaming smoothness (longest stall after the first token,
gaps over a threshold). One module summarises simulated and live traces alike.

User-visible output arrives in chunks; inside a chunk tokens are spread evenly
between its first and last token, between chunks the gap is the stall.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

STALL_THRESHOLD_S = 0.5
PERCENTILES = (50, 90, 99)


def request_metrics(user_chunks: Sequence[tuple[int, float, float]], arrival_s: float,
                    stall_threshold_s: float = STALL_THRESHOLD_S) -> dict:
    """From the user-visible chunks ``(tokens, first_token_s, end_s)`` in order."""
    if not user_chunks:
        nan = math.nan
        return {"ttft_s": nan, "e2e_s": nan, "tpot_s": nan, "output_tokens": 0, "output_tokens_per_s": nan,
                "longest_stall_s": nan, "stalls_over_threshold": 0}
    out_tokens = sum(c[0] for c in user_chunks)
    ttft = user_chunks[0][1] - arrival_s
    e2e = user_chunks[-1][2] - arrival_s
    tpot = (e2e - ttft) / (out_tokens - 1) if out_tokens > 1 else math.nan
    values, _ = itl_samples(user_chunks)
    longest = max(values) if values else 0.0
    over = sum(1 for v in values if v > stall_threshold_s)
    return {"ttft_s": ttft, "e2e_s": e2e, "tpot_s": tpot, "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / e2e if e2e > 0 else math.nan,
            "longest_stall_s": longest, "stalls_over_threshold": over}


def itl_samples(user_chunks: Sequence[tuple[int, float, float]]) -> tuple[list[float], list[int]]:
    """Inter-token latencies as (value, weight): the even gap inside each chunk (weight
    tokens - 1) and the stall before each later chunk (weight 1)."""
    values: list[float] = []
    weights: list[int] = []
    prev_end = None
    for tokens, first, end in user_chunks:
        if prev_end is not None:
            values.append(first - prev_end)
            weights.append(1)
        if tokens > 1:
            values.append((end - first) / (tokens - 1))
            weights.append(tokens - 1)
        prev_end = end
    return values, weights


def weighted_percentile(values: Iterable[float], q: float, weights: Iterable[float] | None = None) -> float:
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if v.size == 0:
        return math.nan
    if weights is None:
        return float(np.percentile(v, q))
    w = np.asarray(list(weights), dtype=float)
    order = np.argsort(v)
    v, w = v[order], w[order]
    cum = np.cumsum(w)
    target = q / 100.0 * cum[-1]
    return float(v[min(np.searchsorted(cum, target, side="left"), v.size - 1)])


def chunk_itl(chunks: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """ITL samples of every request from a chunk trace's user-visible rows."""
    values: list[float] = []
    weights: list[int] = []
    user = chunks[chunks["user_visible"]].sort_values(["request_id", "chunk_index"])
    for _, g in user.groupby("request_id", sort=False):
        v, w = itl_samples(list(zip(g["tokens"], g["first_token_s"], g["end_s"])))
        values += v
        weights += w
    return np.asarray(values, dtype=float), np.asarray(weights, dtype=float)


def summarize(requests: pd.DataFrame, chunks: pd.DataFrame | None = None) -> dict:
    """One policy's figures. Latency percentiles are over successful requests."""
    ok = requests[requests["outcome"] == "ok"]
    out: dict = {"requests": int(len(requests)), "ok": int(len(ok)), "errors": int(len(requests) - len(ok))}
    for col, name in (("ttft_s", "ttft"), ("e2e_s", "e2e"), ("tpot_s", "tpot"),
                      ("longest_stall_s", "longest_stall")):
        vals = ok[col].dropna().to_numpy()
        for q in PERCENTILES:
            out[f"{name}_p{q}_s"] = weighted_percentile(vals, q)
        out[f"{name}_mean_s"] = float(vals.mean()) if vals.size else math.nan
    rate = ok["output_tokens_per_s"].dropna().to_numpy()
    for q in PERCENTILES:
        out[f"output_tokens_per_s_p{q}"] = weighted_percentile(rate, q)
    if len(ok):
        span = (ok["arrival_s"] + ok["e2e_s"]).max() - requests["arrival_s"].min()
        out["output_throughput_tokens_per_s"] = float(ok["output_tokens"].sum() / span) if span > 0 else math.nan
    else:
        out["output_throughput_tokens_per_s"] = math.nan
    out["output_tokens_mean"] = float(ok["output_tokens"].mean()) if len(ok) else math.nan
    out["prompt_tokens_mean"] = float(requests["prompt_tokens"].mean()) if len(requests) else math.nan
    out["cached_tokens_mean"] = float(requests["cached_tokens"].mean()) if len(requests) else math.nan
    out["prefilled_tokens_mean"] = out["prompt_tokens_mean"] - out["cached_tokens_mean"]
    out["calls_mean"] = float(requests["calls"].mean()) if len(requests) else math.nan
    context = pd.to_numeric(ok["context_tokens"], errors="coerce").dropna().to_numpy() \
        if "context_tokens" in ok else np.array([])
    for q in PERCENTILES:  # the inputs the first answer token is written from (a quality proxy)
        out[f"context_tokens_p{q}"] = weighted_percentile(context, q)
    out["context_tokens_mean"] = float(context.mean()) if context.size else math.nan
    out["stalls_over_threshold_mean"] = float(ok["stalls_over_threshold"].mean()) if len(ok) else math.nan
    if chunks is not None and len(chunks):
        v, w = chunk_itl(chunks[chunks["request_id"].isin(ok["request_id"])])
        for q in PERCENTILES:
            out[f"itl_p{q}_s"] = weighted_percentile(v, q, w)
    return out
