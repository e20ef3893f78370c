"""The simulator: closed-form reference values, purity, modes and workloads."""

from __future__ import annotations

import copy
import gc

import numpy as np
import pandas as pd
import pytest

from staircase.sim.profile import load_profile, parse_profile
from staircase.sim.simulate import simulate, simulate_policies
from staircase.workload import Request, Workload
from sessions import later_session_steps
from staircase.policies import (DeadlineStaircasePolicy, SinglePolicy, StaircasePolicy, WaitAllPolicy,
                              make_policies)
from staircase.prompts import ConsumerPrompts, Piece, TextPieces, query_piece, source_prompt
from staircase.scheduler import Scheduler
from staircase.topology import mad, moa

# ---------------------------------------------------------------- reference check

ENGINES = {
    # name: (prefill base, per token, per token^2, decode base, per seq, per context token, overhead)
    "fast": (0.010, 1.0e-4, 2.0e-8, 0.010, 1.0e-3, 1.0e-6, 0.05),
    "mid": (0.012, 1.5e-4, 3.0e-8, 0.017, 1.0e-3, 2.0e-6, 0.07),
    "slow": (0.015, 2.0e-4, 4.0e-8, 0.031, 2.0e-3, 3.0e-6, 0.02),
    "mid2": (0.011, 1.2e-4, 1.0e-8, 0.021, 1.5e-3, 1.0e-6, 0.09),
    "agg": (0.020, 2.5e-4, 5.0e-8, 0.025, 1.0e-3, 4.0e-6, 0.01),
}


def reference_profile() -> dict:
    def engine(p0, p1, p2, d0, d1, d2, o):
        return {"prefill_s": {"base": p0, "per_token": p1, "per_token2": p2},
                "decode_iteration_s": {"base": d0, "per_seq": d1, "per_context_token": d2},
                "request_overhead_s": o, "max_batch_size": 64, "kv_cache_tokens": 10**6, "block_size_tokens": 16,
                "noise": {"prefill": None, "decode": None, "overhead": None}}
    return {"schema": "staircase-profile/1", "name": "reference", "calibrated": False,
            "engines": {k: engine(*v) for k, v in ENGINES.items()},
            "slots": {"proposers": ["fast", "mid", "slow", "mid2"], "aggregator": "agg"},
            "lengths": {"proposer_factor": None}}


def prefill_s(name: str, tokens: int) -> float:
    p0, p1, p2, *_ = ENGINES[name]
    return p0 + p1 * tokens + p2 * tokens * tokens


def decode_s(name: str, iterations: int, context0: int) -> float:
    """n decode iterations of one sequence whose context starts at context0 tokens."""
    _, _, _, d0, d1, d2, _ = ENGINES[name]
    return sum(d0 + d1 + d2 * (context0 + j) for j in range(iterations))


def overhead_s(name: str) -> float:
    return ENGINES[name][6]


def aggregator_prompt_tokens(layout: str, inputs: list[list[Piece]], query: Piece, texts: TextPieces) -> int:
    return ConsumerPrompts(layout, "aggregator", query, [f"L0.p{i}" for i in range(len(inputs))], 0,
                           texts).next(inputs).tokens


@pytest.mark.parametrize("layout", ["standard", "prefix-cache"])
@pytest.mark.parametrize("redundancy", [0, 1, 2])
def test_one_request_matches_closed_form(layout, redundancy):
    """One request, no noise, no contention: simulated TTFT equals the closed form."""
    profile = parse_profile(reference_profile())
    topo = moa(proposers=4)
    query_tokens, output_tokens, first_chunk = 300, 200, 8
    req = [Request(0, 0.0, query_tokens, output_tokens)]
    texts = TextPieces()
    query = query_piece(None, query_tokens, texts.tokenizer)
    src_tokens = source_prompt(query, texts).tokens
    models = [profile.engine_for_slot(f"proposer-{i}")[1].name for i in range(4)]

    # staircase: (N - r)-th fastest first chunk, then aggregator overhead + prefill (which gives token 1)
    first_chunk_s = sorted(
        (overhead_s(m) + prefill_s(m, src_tokens) + decode_s(m, first_chunk - 1, src_tokens + 1), i)
        for i, m in enumerate(models))
    ready_s, _ = first_chunk_s[4 - redundancy - 1]
    delivered = {i for t, i in first_chunk_s if t <= ready_s}
    inputs = [[Piece(("out", f"L0.p{i}", 0), first_chunk)] if i in delivered else [] for i in range(4)]
    agg_tokens = aggregator_prompt_tokens(layout, inputs, query, texts)
    expected = ready_s + overhead_s("agg") + prefill_s("agg", agg_tokens)

    policy = StaircasePolicy((first_chunk, 128, 256), (8, 128, 128), redundancy, "first", layout)
    trace = simulate(topo, policy, req, profile, noise=False)
    assert trace.requests["outcome"].tolist() == ["ok"]
    assert trace.requests["ttft_s"].iloc[0] == pytest.approx(expected, abs=1e-9)
    assert trace.requests["ttft_s"].iloc[0] != pytest.approx(expected + 1e-6, abs=1e-9)


def test_wait_all_and_single_match_closed_form():
    profile = parse_profile(reference_profile())
    topo = moa(proposers=4)
    query_tokens, output_tokens = 250, 120
    req = [Request(0, 0.0, query_tokens, output_tokens)]
    texts = TextPieces()
    query = query_piece(None, query_tokens, texts.tokenizer)
    src_tokens = source_prompt(query, texts).tokens
    models = [profile.engine_for_slot(f"proposer-{i}")[1].name for i in range(4)]
    done_s = max(overhead_s(m) + prefill_s(m, src_tokens) + decode_s(m, output_tokens - 1, src_tokens + 1)
                 for m in models)
    inputs = [[Piece(("out", f"L0.p{i}", 0), output_tokens)] for i in range(4)]
    agg_tokens = aggregator_prompt_tokens("standard", inputs, query, texts)
    expected_wait_all = done_s + overhead_s("agg") + prefill_s("agg", agg_tokens)
    traces = simulate_policies(topo, [WaitAllPolicy(), SinglePolicy()], req, profile, noise=False)
    assert traces["wait-all"].requests["ttft_s"].iloc[0] == pytest.approx(expected_wait_all, abs=1e-9)
    single_ttft = overhead_s("agg") + prefill_s("agg", src_tokens)
    single = traces["single"].requests.iloc[0]
    assert single["ttft_s"] == pytest.approx(single_ttft, abs=1e-9)
    # E2E: the arithmetic series of decode iterations, split over the report chunks
    assert single["e2e_s"] == pytest.approx(single_ttft + decode_s("agg", output_tokens - 1, src_tokens + 1), abs=1e-9)
    assert single["output_tokens"] == output_tokens


# ------------------------------------------------------------------ purity, modes

SMALL = Workload("poisson", requests=40, rate_per_s=0.5)


def test_simulate_is_a_pure_function_of_inputs_and_seed():
    profile = load_profile("illustrative-gpu")
    policy = StaircasePolicy(redundancy=2)
    a = simulate(moa(6), policy, SMALL, profile, seed=7)
    b = simulate(moa(6), policy, SMALL, profile, seed=7)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.chunks, b.chunks)
    c = simulate(moa(6), policy, SMALL, profile, seed=8)
    assert not np.allclose(a.requests["ttft_s"], c.requests["ttft_s"])


def test_policies_see_the_same_requests_and_lengths():
    traces = simulate_policies(moa(3), make_policies(["wait-all", "single"]), SMALL, load_profile("illustrative-gpu"), seed=3)
    a, b = traces["wait-all"].requests, traces["single"].requests
    assert (a["arrival_s"].to_numpy() == b["arrival_s"].to_numpy()).all()
    assert (a["query_tokens"].to_numpy() == b["query_tokens"].to_numpy()).all()
    # the final node's answer length does not depend on the policy
    assert (a["output_tokens"].to_numpy() == b["output_tokens"].to_numpy()).all()


def test_summary_only_keeps_the_same_request_metrics():
    profile = load_profile("illustrative-gpu")
    policy = StaircasePolicy(redundancy=1, layout="standard")
    full = simulate(moa(4), policy, SMALL, profile, seed=1)
    lean = simulate(moa(4), policy, SMALL, profile, seed=1, keep_chunks=False)
    assert lean.chunks is None
    pd.testing.assert_frame_equal(full.requests, lean.requests)


def test_chunk_trace_is_consistent_with_request_rows():
    trace = simulate(moa(4), StaircasePolicy(redundancy=2), SMALL, load_profile("illustrative-gpu"), seed=2)
    chunks, reqs = trace.chunks, trace.requests.set_index("request_id")
    per_req = chunks.groupby("request_id").agg(prompt=("prompt_tokens", "sum"), cached=("cached_tokens", "sum"))
    assert (per_req["prompt"] == reqs["prompt_tokens"]).all()
    assert (per_req["cached"] == reqs["cached_tokens"]).all()
    user = chunks[chunks["user_visible"]]
    assert (user.groupby("request_id")["tokens"].sum() == reqs["output_tokens"]).all()
    assert (chunks["first_token_s"] <= chunks["end_s"] + 1e-12).all()
    assert (chunks["sent_s"] <= chunks["first_token_s"] + 1e-12).all()
    # staircase steps after the first get prefix-cache hits with the append-only layout
    agg = chunks[(chunks["node"] == "agg") & (chunks["prompt_tokens"] > 0)]
    later = agg[agg["call"] > 0]
    assert len(later) and (later["cached_tokens"] > 0).mean() > 0.9


def test_prefix_cache_layout_prefills_fewer_tokens_than_standard():
    traces = simulate_policies(moa(6), make_policies(["staircase"]), SMALL, load_profile("illustrative-gpu"), seed=4)
    std = traces["staircase-standard-r2"].requests
    pfx = traces["staircase-prefix-cache-r2"].requests
    prefilled = lambda r: (r["prompt_tokens"] - r["cached_tokens"]).mean()
    assert prefilled(pfx) < prefilled(std)
    assert pfx["cached_tokens"].mean() > std["cached_tokens"].mean()


def test_session_steps_reuse_all_they_read_and_wrote_but_the_last_token():
    """A session step prefills only what its prompt adds (plus the last sampled token),
    whatever the cache holds; prefix-cache calls round their hits down to blocks."""
    policies = [StaircasePolicy((8, 32), (8, 16, 32), 1, "first", layout) for layout in ("prefix-cache", "session")]
    traces = simulate_policies(moa(6), policies, SMALL, load_profile("illustrative-gpu"), seed=4)
    chunks = traces["staircase-session-r1"].chunks
    assert later_session_steps(chunks) >= 2 * chunks["request_id"].nunique()
    prefilled = {name: (t.requests["prompt_tokens"] - t.requests["cached_tokens"]).sum() for name, t in traces.items()}
    assert prefilled["staircase-session-r1"] < prefilled["staircase-prefix-cache-r1"]


def test_new_tokens_after_a_cached_prefix_cost_their_attention_over_it():
    """A profile's per_token_cached (0 when absent: profiles from before keep their
    results) lengthens the first-token wait of calls with a cached prefix."""
    base = reference_profile()
    cross = copy.deepcopy(base)
    for e in cross["engines"].values():
        e["prefill_s"]["per_token_cached"] = 5e-6
    assert parse_profile(base).engines["agg"].prefill_per_token_cached_s == 0.0
    model = parse_profile(cross).engines["agg"]
    assert model.prefill_s(100, 100 * 100, 100 * 500) - model.prefill_s(100) == pytest.approx(5e-6 * 100 * 500)
    policy = StaircasePolicy((8, 32), (8, 16, 32), 1, "first", "prefix-cache")
    w = Workload("poisson", requests=10, rate_per_s=0.05, query_tokens=300, output_tokens=64)
    waits = {}
    for name, raw in (("base", base), ("cross", cross)):
        c = simulate(moa(4), policy, w, parse_profile(raw), seed=2, max_tokens=64, noise=False, progress=False).chunks
        c = c[(c["node"] == "agg") & (c["prompt_tokens"] > 0)]
        waits[name] = (c["first_token_s"] - c["sent_s"]).to_numpy(), c["cached_tokens"].to_numpy()
    (w0, k0), (w1, k1) = waits["base"], waits["cross"]
    assert (k0 > 0).sum() >= 10 and (k1 > 0).sum() >= 10
    assert w1[k1 > 0].mean() > w0[k0 > 0].mean() + 5e-6 * 16 * np.median(k0[k0 > 0])  # at least 16 new tokens each


def test_staircase_beats_wait_all_on_ttft_for_every_request_at_low_load():
    w = Workload("poisson", requests=30, rate_per_s=0.02)
    traces = simulate_policies(moa(6), make_policies(["wait-all", "staircase-prefix-cache"]), w, load_profile("illustrative-gpu"), seed=5)
    wait, stair = traces["wait-all"].requests, traces["staircase-prefix-cache-r2"].requests
    assert (stair["ttft_s"].to_numpy() < wait["ttft_s"].to_numpy()).all()


def test_more_load_means_longer_waits():
    profile = load_profile("illustrative-gpu")
    policy = WaitAllPolicy()
    light = simulate(moa(3), policy, Workload("poisson", requests=60, rate_per_s=0.05), profile, seed=1)
    heavy = simulate(moa(3), policy, Workload("poisson", requests=60, rate_per_s=5.0), profile, seed=1)
    assert heavy.requests["e2e_s"].median() > 1.5 * light.requests["e2e_s"].median()


def test_closed_loop_keeps_concurrency_users():
    w = Workload("closed", requests=30, concurrency=3)
    trace = simulate(moa(3), StaircasePolicy(redundancy=1), w, load_profile("illustrative-gpu"), seed=1)
    r = trace.requests.sort_values("arrival_s")
    assert len(r) == 30 and (r["outcome"] == "ok").all()
    assert (r["arrival_s"].iloc[:3] == 0).all() and (r["arrival_s"].iloc[3:] > 0).all()
    # at every arrival at most 3 requests are in flight
    starts, ends = r["arrival_s"].to_numpy(), (r["arrival_s"] + r["e2e_s"]).to_numpy()
    for t in starts:
        assert ((starts <= t) & (ends > t + 1e-12)).sum() <= 3


@pytest.mark.parametrize("topology", [moa(3, layers=2), mad(3, 2)], ids=["moa-2-layers", "mad"])
def test_multi_stage_topologies_run_every_policy(topology):
    traces = simulate_policies(topology, make_policies(["wait-all", "staircase", "single"], redundancies=(1,)),
                               Workload("poisson", requests=15, rate_per_s=0.2), load_profile("illustrative-gpu"), seed=2)
    for name, t in traces.items():
        assert (t.requests["outcome"] == "ok").all(), name
    stage_counts = traces["staircase-prefix-cache-r1"].chunks.groupby("stage")["node"].nunique()
    assert len(stage_counts) == 3
    assert traces["staircase-prefix-cache-r1"].requests["ttft_s"].median() < traces["wait-all"].requests["ttft_s"].median()


def test_deadline_policy_starts_no_later_than_its_deadline():
    w = Workload("poisson", requests=20, rate_per_s=0.05)
    profile = load_profile("illustrative-gpu")
    base = StaircasePolicy(redundancy=0)
    deadline = DeadlineStaircasePolicy(max_wait_s=0.05, redundancy=0)
    a = simulate(moa(6), base, w, profile, seed=3)
    b = simulate(moa(6), deadline, w, profile, seed=3)
    assert (b.requests["outcome"] == "ok").all()
    assert b.requests["ttft_s"].median() < a.requests["ttft_s"].median()
    first_agg = b.chunks[(b.chunks["node"] == "agg") & (b.chunks["chunk_index"] == 0)].set_index("request_id")
    first_input = b.chunks[(b.chunks["stage"] == 0) & (b.chunks["chunk_index"] == 0)].groupby("request_id")["end_s"].min()
    assert (first_agg["sent_s"] <= first_input + 0.05 + 1e-9).all()


def test_azure_replay_uses_real_arrivals_and_lengths():
    w = Workload("azure", requests=25, time_scale=1.0)
    trace = simulate(moa(3), StaircasePolicy(redundancy=1), w, load_profile("illustrative-gpu"), seed=0, max_tokens=256)
    r = trace.requests
    assert len(r) == 25 and r["arrival_s"].iloc[0] == 0.0
    assert r["query_tokens"].iloc[0] == 374  # the trace's first ContextTokens
    assert (r["output_tokens"] <= 256).all()


def test_engine_sharing_one_puts_every_slot_on_one_engine():
    raw = copy.deepcopy(load_profile("illustrative-gpu").raw)
    raw["engine_sharing"] = "one"
    shared = parse_profile(raw)
    t = simulate(moa(3), WaitAllPolicy(), SMALL, shared, seed=1)
    assert set(t.chunks["engine"]) == {"shared"}
    separate = simulate(moa(3), WaitAllPolicy(), SMALL, load_profile("illustrative-gpu"), seed=1)
    assert t.requests["e2e_s"].median() > separate.requests["e2e_s"].median()


def test_finished_requests_are_freed_without_the_cycle_collector():
    """A finished request's driver, scheduler and calls leave no reference cycle, so
    refcounting frees them at once: with the collector off, no Scheduler is left over.
    (A cycle through the views' load callback once cost a tenth of the simulator's speed.)"""
    def schedulers() -> int:
        return sum(type(o) is Scheduler for o in gc.get_objects())

    policy = StaircasePolicy(redundancy=1, scope="every")
    gc.collect()
    gc.disable()
    try:
        before = schedulers()
        trace = simulate(moa(3), policy, Workload("poisson", requests=40, rate_per_s=0.2, output_tokens=64),
                         load_profile(), seed=0, max_tokens=64, keep_chunks=False, progress=False)
        left = schedulers() - before
    finally:
        gc.enable()
    assert len(trace.requests) == 40 and left == 0
