"""The check the simulator's and the live runner's session tests share: every aggregator
step after a request's first reads from its session all the step before read and wrote,
but the last sampled token (which vLLM streams out without keeping)."""

from __future__ import annotations

import pandas as pd


def later_session_steps(chunks: pd.DataFrame) -> int:
    """Assert the rule on every request of a chunk trace; the number of later steps."""
    agg = chunks[chunks["node"] == "agg"]
    calls = agg.groupby(["request_id", "call"]).agg(prompt=("prompt_tokens", "max"), cached=("cached_tokens", "max"),
                                                   out=("tokens", "sum")).reset_index()
    later = 0
    for rid, c in calls.groupby("request_id"):
        prev, cur = c.iloc[:-1], c.iloc[1:]
        assert (cur["cached"].to_numpy() == (prev["prompt"] + prev["out"] - 1).to_numpy()).all(), rid
        later += len(cur)
    return later
