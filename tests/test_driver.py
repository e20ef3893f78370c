"""One request driver, one record: the simulator and the live runner run the same
request shapes through ``staircase.driver`` and record them alike, field by field.

The live side here runs on a scripted engine (answers of known lengths, no model),
a fast extra; tests/test_live.py runs the same driver on real vLLM engines."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

from adaptive import RandomChunksPolicy, ScheduleAsYouGoPolicy
from staircase.live.engines import Delta, Engine, EngineError
from staircase.live.runner import LiveRunner
from staircase.live.watchdog import StallLimits
from staircase.sim.profile import load_profile
from staircase.sim.simulate import simulate
from staircase.workload import Request
from staircase.policies import SinglePolicy, StaircasePolicy, WaitAllPolicy
from staircase.topology import mad, moa

LENGTH = 40  # every node's natural answer, in tokens


class ScriptedEngine(Engine):
    """Streams ``LENGTH`` tokens per node and request (over all its calls), one per
    delta; ``fail_nodes`` break off once they have produced ``fail_after`` tokens (the
    simulator's ``faults`` do the same)."""

    def __init__(self, name: str = "scripted", fail_nodes: tuple[str, ...] = (), fail_after: int = 0):
        self.name = name
        self.fail_nodes = fail_nodes
        self.fail_after = fail_after
        self.produced: dict[tuple[str, str], int] = {}

    async def stream(self, request_id, prompt, max_tokens, sampling):
        prefix, node, _call = request_id.rsplit("-", 2)
        done = self.produced.get((prefix, node), 0)
        n = min(max_tokens, LENGTH - done)
        for i in range(n):
            await asyncio.sleep(0.001)
            if node in self.fail_nodes and done + i >= self.fail_after:
                raise EngineError(f"injected failure after {done + i} tokens")
            self.produced[(prefix, node)] = done + i + 1
            last = i == n - 1
            finish = None if not last else ("stop" if done + n >= LENGTH else "length")
            yield Delta(f" t{done + i}", 1, finish, prompt.tokens if i == 0 else None, 0 if i == 0 else None)


def _live(topology, policy, requests: int, engine=None):
    engine = engine or ScriptedEngine()
    slots = {n.slot: engine for n in topology.nodes}
    runner = LiveRunner(slots, topology, max_tokens=64, stall=StallLimits(gap_s=5.0))
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(runner.run_policy(policy, [f"question {i}" for i in range(requests)],
                                                         prompt_ids=[f"set/{i}" for i in range(requests)]))
    finally:
        loop.close()


def _sim(topology, policy, requests: int, faults=None):
    reqs = [Request(i, float(i) * 100.0, 30, LENGTH, f"question {i}") for i in range(requests)]
    lengths = {n.id: [LENGTH] * requests for n in topology.nodes}
    return simulate(topology, policy, reqs, load_profile(), max_tokens=64, noise=False, node_lengths=lengths,
                    faults=faults)


CHUNK_FIELDS = ["request_id", "policy", "node", "role", "stage", "call", "chunk_index", "tokens", "user_visible"]
REQUEST_FIELDS = ["request_id", "policy", "outcome", "error", "lost", "output_tokens", "calls"]


@pytest.mark.parametrize("topology,policy", [(moa(3), WaitAllPolicy()), (moa(2, layers=2), WaitAllPolicy()),
                                             (mad(3, 2), WaitAllPolicy()), (moa(3), SinglePolicy())],
                         ids=["moa-wait-all", "moa-2-layers", "mad-wait-all", "single"])
def test_sim_and_live_record_the_same_request_shapes(topology, policy):
    live, sim = _live(topology, policy, 3), _sim(topology, policy, 3)
    order = ["request_id", "node", "call", "chunk_index"]
    lc = live.chunks[CHUNK_FIELDS].sort_values(order).reset_index(drop=True)
    sc = sim.chunks[CHUNK_FIELDS].sort_values(order).reset_index(drop=True)
    pd.testing.assert_frame_equal(lc, sc)  # single: the final node's stage is the planned topology's in both
    pd.testing.assert_frame_equal(live.requests[REQUEST_FIELDS], sim.requests[REQUEST_FIELDS])
    assert list(live.chunks.columns) == list(sim.chunks.columns)
    assert list(live.requests.columns) == list(sim.requests.columns)


def test_live_keeps_the_texts_and_prompt_ids_the_simulator_leaves_empty():
    live, sim = _live(moa(3), WaitAllPolicy(), 2), _sim(moa(3), WaitAllPolicy(), 2)
    answers = live.requests["answer_text"]
    assert (answers == " " + " ".join(f"t{i}" for i in range(LENGTH))).all()
    assert list(live.requests["prompt_id"]) == ["set/0", "set/1"]
    for (rid, node), rows in live.chunks.groupby(["request_id", "node"]):
        assert "".join(rows.sort_values("chunk_index")["text"]).startswith(" t0 t1")
    assert sim.requests["answer_text"].isna().all() and sim.chunks["text"].isna().all()


@pytest.mark.parametrize("policy,fail_after", [(WaitAllPolicy(tolerance=1), 0), (WaitAllPolicy(tolerance=1), 17),
                                               (WaitAllPolicy(tolerance=0), 17),
                                               (StaircasePolicy((4,), (4,), redundancy=1), 0),
                                               (StaircasePolicy((4,), (4,), redundancy=0), 0)],
                         ids=["wait-all-tolerated-at-once", "wait-all-tolerated-mid-answer", "wait-all-fatal",
                              "staircase-tolerated", "staircase-fatal"])
def test_a_failure_is_recorded_alike_by_both_runners(policy, fail_after):
    """The same fault (L0.p1's answer breaks off after ``fail_after`` tokens) in the
    simulator (``faults``) and live (a scripted engine): the same outcome, error, lost
    inputs and chunks up to the failure."""
    sim = _sim(moa(3), policy, 2, faults={"L0.p1": fail_after})
    live = _live(moa(3), policy, 2, ScriptedEngine(fail_nodes=("L0.p1",), fail_after=fail_after))
    pd.testing.assert_frame_equal(live.requests[REQUEST_FIELDS[:5]], sim.requests[REQUEST_FIELDS[:5]])
    row = sim.requests.iloc[0]
    assert row["lost"] == f"L0.p1: injected failure after {fail_after} tokens"
    assert (row["outcome"] == "ok") == (policy.tolerance >= 1), row["error"]
    if row["outcome"] == "error":
        assert "L0.p1 (injected failure" in row["error"]
    failed = lambda t: t.chunks[t.chunks["node"] == "L0.p1"][CHUNK_FIELDS].reset_index(drop=True)
    pd.testing.assert_frame_equal(failed(live), failed(sim))  # chunks delivered before the break
    if isinstance(policy, StaircasePolicy) and fail_after == 0:
        assert failed(sim).empty
    assert sim.meta["faults"] == {"L0.p1": fail_after}


def test_a_fault_mid_stream_delivers_the_chunks_before_it_in_the_simulator():
    t = _sim(moa(3), StaircasePolicy((4,), (4,), redundancy=1), 1, faults={"L0.p1": 10})
    rows = t.chunks[t.chunks["node"] == "L0.p1"]
    assert list(rows["tokens"]) == [4, 4] and t.requests.iloc[0]["outcome"] == "ok"  # tokens 9-10 lost
    t = _sim(moa(3), StaircasePolicy((4,), (4,), redundancy=1), 1, faults={"L0.p1": 8})
    assert list(t.chunks[t.chunks["node"] == "L0.p1"]["tokens"]) == [4, 4]  # a boundary at the break: delivered


def test_a_simulated_call_is_a_complete_call_record():
    """SimCall sets CallRecord's fields itself (speed): every slot must be set."""
    from staircase.sim.engine import SimCall
    from staircase.driver import CallRecord

    t = _sim(moa(2), WaitAllPolicy(), 1)
    assert len(t.requests) == 1
    call = SimCall(None, type("G", (), {"max_tokens": 8, "boundaries": (8,)})(), None, 0, None, 1, 0, 0, None, 8)
    for slot in CallRecord.__slots__:
        getattr(call, slot)  # raises AttributeError if SimCall left one unset


# ------------------------------------------------------------- the adaptive protocol


def test_the_fixed_staircase_through_the_adaptive_protocol_runs_the_same_in_the_simulator():
    """Chunk sizes asked as calls stream (NextChunk) and steps sized by the decision give
    exactly the fixed policy's run: same chunks, same times."""
    kw = dict(proposer_schedule=(3, 5, 7), aggregator_schedule=(2, 4), redundancy=1)
    for topology in (moa(3), mad(3, 2)):
        fixed, adaptive = _sim(topology, StaircasePolicy(**kw), 4), _sim(topology, ScheduleAsYouGoPolicy(**kw), 4)
        pd.testing.assert_frame_equal(fixed.chunks, adaptive.chunks)
        pd.testing.assert_frame_equal(fixed.requests, adaptive.requests)
        assert (fixed.chunks["chunk_index"] > 3).any()  # several chunks per call: boundaries were extended


def _chosen_sizes_hold(trace, policy: RandomChunksPolicy, runner: str) -> int:
    """Every chunk a source node delivered has the size the policy chose for it when the
    chunk before it was reached (the last one of an answer may be cut by its end)."""
    checked = 0
    for (rid, node), rows in trace.chunks.groupby(["request_id", "node"]):
        chosen = policy.states[rid]["chunks"]
        rows = rows.sort_values("chunk_index")
        for j, tokens in enumerate(rows["tokens"][:-1]):
            if (node, j) in chosen:  # a streamed chunk (a step's single chunk is sized by the decision)
                assert tokens == chosen[(node, j)], (runner, rid, node, j)
                checked += 1
    return checked


def test_both_runners_honour_chunk_boundaries_set_while_calls_stream():
    topology = moa(3)
    sim_policy, live_policy = RandomChunksPolicy(2, 9, redundancy=1), RandomChunksPolicy(2, 9, redundancy=1)
    sim, live = _sim(topology, sim_policy, 3), _live(topology, live_policy, 3)
    assert _chosen_sizes_hold(sim, sim_policy, "sim") > 10 and _chosen_sizes_hold(live, live_policy, "live") > 10
    # per-request state: one policy object, one state per request, each its own draws
    assert len(sim_policy.states) == len(live_policy.states) == 3
    assert sim_policy.states[0]["chunks"] != sim_policy.states[1]["chunks"]
    # the same draws give the proposers the same chunks in both runners (they do not wait on anything)
    props = lambda t: t.chunks[t.chunks["stage"] == 0][["request_id", "node", "chunk_index", "tokens"]] \
        .sort_values(["request_id", "node", "chunk_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(props(sim), props(live))
    for t in (sim, live):
        assert (t.requests["outcome"] == "ok").all() and (t.requests["output_tokens"] == LENGTH).all()


@pytest.mark.parametrize("faults,field", [({"L0.p9": 3}, "faults"), ({"L0.p1": -1}, "faults.L0.p1"),
                                          ({"L0.p1": 2.5}, "faults.L0.p1"), ([("L0.p1", 3)], "faults")])
def test_bad_faults_are_named_before_any_work(faults, field):
    from staircase.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _sim(moa(3), WaitAllPolicy(), 1, faults=faults)
    assert err.value.field == field
