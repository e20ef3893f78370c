"""The adaptive staircase policies (``staircase.policies.adaptive``) on the real simulator and
the bare scheduler. Their invariants under random event orders are in
``test_scheduler_stateful.py``; here: what each promises, and what it adds."""

from __future__ import annotations

import pytest

from staircase.sim.profile import load_profile
from staircase.sim.simulate import simulate
from staircase.workload import Workload
from staircase.policies import (ADAPTIVE_POLICIES, LoadAwareStaircasePolicy, SmoothStaircasePolicy,
                                StragglerStaircasePolicy)
from staircase.errors import ConfigError
from staircase.policies import POLICY_KINDS, StaircasePolicy, config_from_dict, WaitAllPolicy
from staircase.scheduler import Chunk, Finished, Generate, Query, Scheduler, SetTimer, TimerFired
from staircase.topology import moa

SAME_COLUMNS = ["request_id", "arrival_s", "outcome", "ttft_s", "e2e_s", "output_tokens", "longest_stall_s", "calls",
                "prompt_tokens", "cached_tokens"]


def run(policy, requests=30, profile="default", rate=0.05, **kw):
    return simulate(moa(3), policy, Workload("poisson", requests=requests, rate_per_s=rate, output_tokens=96),
                    load_profile(profile), seed=3, max_tokens=96, progress=False, **kw)


@pytest.mark.parametrize("cls", ADAPTIVE_POLICIES)
def test_adaptive_policies_are_data_with_knobs(cls):
    assert POLICY_KINDS[cls.KIND] is cls
    policy = cls(redundancy=1)
    config = policy.config()
    assert config_from_dict(config.to_dict()).build().config() == config
    own = set(cls.PARAMS) - set(StaircasePolicy.PARAMS)
    assert own and own <= {k.name for k in cls.KNOBS}  # the search sees every new parameter


@pytest.mark.parametrize("kwargs, field", [({"min_chunk": 9, "max_chunk": 4}, "min_chunk"),
                                           ({"slack": 0}, "slack"), ({"first_chunk": 2.5}, "first_chunk")])
def test_smooth_policy_rejects_bad_bounds_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        SmoothStaircasePolicy(**kwargs)
    assert err.value.field == field


def test_smooth_policy_cuts_the_stall_after_the_first_token():
    paper = run(StaircasePolicy(redundancy=1)).requests
    smooth_policy = SmoothStaircasePolicy(redundancy=1, min_chunk=2, max_chunk=64)
    trace = run(smooth_policy)
    smooth = trace.requests
    assert (smooth["outcome"] == "ok").all()
    assert smooth["longest_stall_s"].median() < 0.7 * paper["longest_stall_s"].median()
    chunks = trace.chunks
    source = chunks[chunks["stage"] == 0].sort_values(["request_id", "node", "chunk_index"])
    for _, g in source.groupby(["request_id", "node"]):
        sizes = g["tokens"].tolist()
        assert sizes[0] <= smooth_policy.first_chunk
        assert all(2 <= s <= 64 for s in sizes[1:-1]) and all(s <= 64 for s in sizes[1:])


def test_straggler_policy_waits_for_the_spread_then_goes_with_those_in_hand():
    policy = StragglerStaircasePolicy(patience=1.0, redundancy=1, proposer_schedule=[4], aggregator_schedule=[4])
    sched = Scheduler(moa(3), policy, Query("q", 5), max_tokens=16)
    sched.start(0.0)
    assert sched.on(Chunk("L0.p0", 0, 0, 4), 1.0) == []  # 1 of 3: fewer than N - r
    actions = sched.on(Chunk("L0.p1", 0, 0, 4), 1.2)  # 2 of 3: wait the spread seen (0.2 s) for the third
    timers = [a for a in actions if isinstance(a, SetTimer)]
    assert len(timers) == 1 and timers[0].delay_s == pytest.approx(0.2)
    assert not any(isinstance(a, Generate) for a in actions)
    go = sched.on(TimerFired(timers[0].key), 1.4)
    assert [a.node for a in go if isinstance(a, Generate)] == [sched.topology.final.id]


def test_straggler_policy_with_endless_patience_is_the_staircase_waiting_for_all():
    patient = run(StragglerStaircasePolicy(patience=1e6, redundancy=1, scope="every")).requests
    all_in = run(StaircasePolicy(redundancy=0)).requests
    assert patient[SAME_COLUMNS].equals(all_in[SAME_COLUMNS])


def test_load_aware_policy_is_the_staircase_when_idle_and_one_final_call_when_busy():
    never_busy = run(LoadAwareStaircasePolicy(busy_calls=10**6, redundancy=1)).requests
    staircase = run(StaircasePolicy(redundancy=1)).requests
    assert never_busy[SAME_COLUMNS].equals(staircase[SAME_COLUMNS])
    # one engine serves every slot here, so the aggregator always sees its proposers' calls in flight
    busy = run(LoadAwareStaircasePolicy(busy_calls=1, redundancy=1)).requests
    assert (busy["calls"] == 4).all() and (staircase["calls"] > 4).any()


def test_load_aware_policy_is_never_much_worse_than_wait_all_under_overload():
    """The paper's shape (6 proposers of three sizes, 300-token answers) at about 1.2 x
    wait-all's capacity (1.13 requests/s, ``staircase.sim.capacity``)."""
    def e2e(policy):
        return simulate(moa(6), policy, Workload("poisson", requests=400, rate_per_s=1.35, output_tokens=300),
                        load_profile("illustrative-gpu"), seed=0, max_tokens=512, keep_chunks=False,
                        progress=False).requests["e2e_s"].median()
    wait_all, staircase = e2e(WaitAllPolicy()), e2e(StaircasePolicy(redundancy=2))
    load = e2e(LoadAwareStaircasePolicy(busy_calls=16, redundancy=2))
    assert staircase > 1.05 * wait_all  # the fixed staircase's loss under load, which the load-aware policy avoids
    assert load < 1.1 * wait_all


def test_ttft_target_policy_reads_the_most_context_that_fits_its_target():
    """On the calibrated CPU profile at light load: every TTFT within the target, and
    more context at the first token than the paper's staircase; a target already missed
    goes with any input in hand (no later than the staircase)."""
    from staircase.policies import TTFTTargetStaircasePolicy

    paper = run(StaircasePolicy(redundancy=1)).requests
    # first_token_s: the profile's aggregator call-to-first-token (overhead, queue, prefill) is up to ~0.65 s here
    policy = TTFTTargetStaircasePolicy(ttft_target_s=3.0, first_token_s=1.0, redundancy=1)
    target = run(policy).requests
    assert (target["outcome"] == "ok").all()
    assert target["ttft_s"].max() <= 3.0
    assert target["ttft_s"].median() > paper["ttft_s"].median()  # it spends the TTFT budget ...
    assert target["context_tokens"].median() >= 2 * paper["context_tokens"].median()  # ... on context
    missed = run(TTFTTargetStaircasePolicy(ttft_target_s=0.001, first_token_s=0.0, redundancy=1,
                                           proposer_schedule=(8, 128, 256))).requests
    assert missed["ttft_s"].median() <= paper["ttft_s"].median() + 1e-9
    assert missed["context_tokens"].median() <= paper["context_tokens"].median()
    with pytest.raises(ConfigError) as err:
        TTFTTargetStaircasePolicy(ttft_target_s=0)
    assert err.value.field == "ttft_target_s"


def test_lead_in_policy_answers_at_single_model_first_token_time():
    """The paper-shaped scenario (illustrative GPU profile, 6 proposers, r = 2, 512-token
    answers): the lead-in's TTFT p50 within 2x of `single` (the staircase's is over 4x),
    every request ok, and the answer still reads the proposals (context after the lead-in)."""
    from staircase.policies import LeadInStaircasePolicy, SinglePolicy

    def paper(policy):
        return simulate(moa(6), policy, Workload("poisson", requests=60, rate_per_s=0.4, output_tokens=300),
                        load_profile("illustrative-gpu"), seed=3, max_tokens=512, progress=False).requests

    single = paper(SinglePolicy())["ttft_s"].median()
    lead_in = paper(LeadInStaircasePolicy(redundancy=2))
    staircase = paper(StaircasePolicy(redundancy=2))["ttft_s"].median()
    assert (lead_in["outcome"] == "ok").all()
    assert lead_in["ttft_s"].median() <= 2 * single < staircase / 2
    assert lead_in["context_tokens"].median() == 0  # the first token is written from the query alone
    assert lead_in["prompt_tokens"].median() > 2 * paper(SinglePolicy())["prompt_tokens"].median()  # proposals read


def test_lead_in_policy_waits_for_its_budget_and_then_goes_with_what_arrived():
    """lead_in_s = 0.5: no step before 0.5 s unless N - r first chunks are in; at the
    timer, a lead-in of lead_in_tokens reading the one chunk that arrived (no lead-in
    instruction then); with none, the prompt carries the lead-in round."""
    from staircase.policies import LeadInStaircasePolicy
    from staircase.prompts import LEAD_IN_ROUND

    policy = LeadInStaircasePolicy(lead_in_s=0.5, lead_in_tokens=6, redundancy=1)
    sched = Scheduler(moa(3), policy, Query("What is 2 + 2?"), 40)
    timers = [a for a in sched.start(0.0) if isinstance(a, SetTimer)]
    assert [t.delay_s for t in timers] == [pytest.approx(0.5)]
    assert not [a for a in sched.on(Chunk("L0.p0", 0, 0, 8, "Four."), 0.2) if isinstance(a, Generate)]
    step = [a for a in sched.on(TimerFired(timers[0].key), 0.5) if isinstance(a, Generate)]
    assert len(step) == 1 and step[0].max_tokens == 6 and step[0].step == 0
    assert "Four." in step[0].prompt.render() and LEAD_IN_ROUND not in step[0].prompt.render()

    at_once = Scheduler(moa(3), LeadInStaircasePolicy(redundancy=1), Query("What is 2 + 2?"), 40)
    lead = [a for a in at_once.start(0.0) if isinstance(a, Generate) and a.node == "agg"]
    assert len(lead) == 1 and LEAD_IN_ROUND in lead[0].prompt.render() and lead[0].max_tokens == 16
    # the model ends its lead-in (EOS) after 5 tokens: the answer goes on once the inputs' first chunks are in
    at_once.on(Chunk("agg", 0, 0, 5, "Two plus two?"), 0.1)
    assert not at_once.on(Finished("agg", 0, "stop"), 0.1)
    at_once.on(Chunk("L0.p0", 0, 0, 8, "It is 4."), 0.2)
    step = [a for a in at_once.on(Chunk("L0.p1", 0, 0, 8, "Four."), 0.3) if isinstance(a, Generate)]
    assert at_once.done is None and len(step) == 1 and step[0].step == 1 and "Four." in step[0].prompt.render()
    with pytest.raises(ConfigError) as err:
        LeadInStaircasePolicy(lead_in_s=-1)
    assert err.value.field == "lead_in_s"
