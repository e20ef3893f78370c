"""Unit tests of the shared core: schedules, policies, topologies, prompts, metrics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from staircase.errors import ConfigError, ProtocolError
from staircase.metrics import itl_samples, request_metrics, weighted_percentile
from staircase.policies import (ChunkSchedule, ConsumerView, DeadlineStaircasePolicy, SinglePolicy,
                              StaircasePolicy, WaitAllPolicy, make_policies)
from staircase.prompts import ApproxTokenizer, ConsumerPrompts, Piece, TextPieces, query_piece
from staircase.scheduler import Chunk, Finished, Generate, Query, Scheduler, TimerFired
from staircase.topology import build, mad, moa

# ------------------------------------------------------------------ schedules


def test_schedule_last_size_repeats():
    s = ChunkSchedule((8, 128, 256))
    assert [s.size(k) for k in range(5)] == [8, 128, 256, 256, 256]
    assert s.boundaries(0, 512) == (8, 136, 392, 512)
    assert s.boundaries(1, 300) == (128, 300)
    assert s.boundaries(0, 5) == (5,)


@pytest.mark.parametrize("text", ["", "0", "8,-1", "a,b", "8,,0"])
def test_bad_schedules_name_the_field(text):
    with pytest.raises(ConfigError) as err:
        ChunkSchedule.parse(text, "proposer_schedule")
    assert "proposer_schedule" in str(err.value) and repr(text) in str(err.value)


def test_schedule_parse_accepts_commas_and_slashes():
    assert ChunkSchedule.parse("8/128, 256").sizes == (8, 128, 256)


# ------------------------------------------------------------------- policies


def view(step: int, ups: list[tuple[int, bool, bool]], now: float = 1.0) -> ConsumerView:
    node = moa(len(ups)).final
    return ConsumerView(node, step, now, 0, tuple(
        SimpleNamespace(node=f"p{i}", chunks=c, tokens=c * 8, finished=fin, failed=fail,
                        chunk_end_s=[0.1 * (j + 1) for j in range(c)])
        for i, (c, fin, fail) in enumerate(ups)))


def test_staircase_waits_for_n_minus_r_on_the_first_step():
    p = StaircasePolicy(redundancy=2, scope="first")
    assert p.decide(view(0, [(1, False, False)] * 3 + [(0, False, False)] * 3)).kind == "wait"
    assert p.decide(view(0, [(1, False, False)] * 4 + [(0, False, False)] * 2)).kind == "step"
    # later steps wait for every live input under scope "first" ...
    assert p.decide(view(1, [(2, False, False)] * 5 + [(1, False, False)])).kind == "wait"
    # ... and for N - r under scope "every"
    assert StaircasePolicy(redundancy=1, scope="every").decide(
        view(1, [(2, False, False)] * 5 + [(1, False, False)])).kind == "step"


def test_staircase_goes_final_when_the_inputs_it_waits_for_finished():
    p = StaircasePolicy(redundancy=1, scope="every")
    assert p.decide(view(3, [(3, True, False)] * 3 + [(1, False, False)])).kind == "final"


def test_staircase_fails_when_more_than_r_inputs_are_lost():
    p = StaircasePolicy(redundancy=1)
    assert p.decide(view(0, [(1, False, False)] * 2 + [(0, False, True)])).kind == "step"
    assert p.decide(view(0, [(1, False, False)] + [(0, False, True)] * 2)).kind == "fail"


def test_wait_all_waits_for_every_input():
    p = WaitAllPolicy()
    assert p.decide(view(0, [(1, True, False), (1, False, False)])).kind == "wait"
    assert p.decide(view(0, [(1, True, False), (1, True, False)])).kind == "final"
    assert p.decide(view(0, [(1, True, False), (0, False, True)])).kind == "fail"


def test_deadline_policy_asks_for_a_timer_then_starts():
    p = DeadlineStaircasePolicy(max_wait_s=0.5, redundancy=0)
    d = p.decide(view(0, [(1, False, False), (0, False, False)], now=0.3))
    assert d.kind == "wait" and d.wake_after_s == pytest.approx(0.3)
    assert p.decide(view(0, [(1, False, False), (0, False, False)], now=0.6)).kind == "step"


def test_make_policies_names_and_errors():
    names = [p.name for p in make_policies(["wait-all", "staircase", "single"], redundancies=(0, 2))]
    assert names == ["wait-all", "staircase-standard-r0", "staircase-standard-r2", "staircase-prefix-cache-r0",
                     "staircase-prefix-cache-r2", "single"]
    with pytest.raises(ConfigError, match="policy: got 'bogus'"):
        make_policies(["bogus"])
    with pytest.raises(ConfigError, match="layout: got 'zigzag'"):
        StaircasePolicy(layout="zigzag")
    with pytest.raises(ConfigError, match="scope"):
        StaircasePolicy(scope="sometimes")
    with pytest.raises(ConfigError, match="redundancy: got -1"):
        StaircasePolicy(redundancy=-1)


def test_redundancy_must_be_below_the_fan_in():
    with pytest.raises(ConfigError, match=r"redundancy: got 3; allowed: 0 <= r < 3"):
        Scheduler(moa(3), StaircasePolicy(redundancy=3), Query("q"))
    SinglePolicy().validate_for(moa(1))


# ------------------------------------------------------------------ topologies


def test_moa_and_mad_shapes():
    t = moa(3, layers=2)
    assert [n.id for n in t.nodes] == ["L0.p0", "L0.p1", "L0.p2", "L1.p0", "L1.p1", "L1.p2", "agg"]
    assert t.by_id["L1.p2"].upstream == ("L0.p0", "L0.p1", "L0.p2")
    assert t.final.upstream == ("L1.p0", "L1.p1", "L1.p2") and t.final.slot == "aggregator"
    assert t.downstream["L0.p1"] == ("L1.p0", "L1.p1", "L1.p2")
    d = mad(3, 2)
    assert d.final.id == "judge" and d.by_id["R1.a0"].upstream == ("R0.a0", "R0.a1", "R0.a2")
    assert d.by_id["R1.a2"].slot == d.by_id["R0.a2"].slot == "proposer-2"
    assert moa(4).only_final().nodes[0].is_source


@pytest.mark.parametrize("call,field", [(lambda: moa(0), "proposers"), (lambda: moa(2, 0), "layers"),
                                        (lambda: mad(1, 2), "agents"), (lambda: build("ring"), "topology")])
def test_bad_topologies_name_the_field(call, field):
    with pytest.raises(ConfigError, match=f"^{field}: got"):
        call()


# --------------------------------------------------------------------- prompts


def test_approx_tokenizer():
    tok = ApproxTokenizer()
    assert tok.count("") == 0 and tok.count("abcd") == 1 and tok.count("abcde") == 2


def _consumer(layout: str, n: int = 3) -> tuple[ConsumerPrompts, Piece]:
    texts = TextPieces()
    q = query_piece("Why is the sky blue?", None, texts.tokenizer)
    return ConsumerPrompts(layout, "aggregator", q, [f"p{i}" for i in range(n)], 0, texts), q


def _chunk(node: str, k: int, text: str) -> Piece:
    return Piece(("out", node, k), ApproxTokenizer().count(text), text)


def test_prefix_cache_prompts_are_append_only_and_reuse_everything_before():
    cp, _ = _consumer("prefix-cache")
    inputs = [[_chunk("p0", 0, "Rayleigh ")], [], [_chunk("p2", 0, "Light scatters ")]]
    p1 = cp.next(inputs)
    cp.add_output(_chunk("agg", 0, "Because "))
    inputs[0].append(_chunk("p0", 1, "scattering favours short waves."))
    inputs[1].append(_chunk("p1", 0, "Blue is scattered more."))
    p2 = cp.next(inputs)
    assert p2.render().startswith(p1.render() + "Because ")
    assert p2.reuse_prefix_tokens == p1.tokens + ApproxTokenizer().count("Because ")
    # a step with no new input text continues the open assistant turn
    cp.add_output(_chunk("agg", 1, "short waves scatter."))
    p3 = cp.next(inputs)
    assert p3.render() == p2.render() + "short waves scatter."
    assert p3.reuse_prefix_tokens == p3.tokens


def test_session_prompts_are_the_prefix_cache_prompts_marked_as_one_session():
    prompts = {}
    for layout in ("prefix-cache", "session"):
        cp, _ = _consumer(layout)
        inputs = [[_chunk("p0", 0, "Rayleigh ")], [], []]
        first = cp.next(inputs)
        cp.add_output(_chunk("agg", 0, "Because "))
        inputs[1].append(_chunk("p1", 0, "Blue is scattered more."))
        prompts[layout] = (first, cp.next(inputs))
    for pfx, ses in zip(prompts["prefix-cache"], prompts["session"]):
        assert ses.render() == pfx.render() and ses.keyed() == pfx.keyed()
        assert (ses.tokens, ses.reuse_prefix_tokens) == (pfx.tokens, pfx.reuse_prefix_tokens)
        assert ses.session and not pfx.session


def test_staircase_names_the_per_call_layouts_and_session_on_its_own():
    assert [p.layout for p in make_policies(["staircase"], redundancies=[1])] == ["standard", "prefix-cache"]
    (session,) = make_policies(["staircase-session"], redundancies=[1])
    assert session.name == "staircase-session-r1" and session.layout == "session"
    with pytest.raises(ConfigError, match="layout"):
        StaircasePolicy(layout="sessions")


def test_standard_prompts_stop_reuse_inside_the_first_grown_slot():
    cp, _ = _consumer("standard")
    inputs = [[_chunk("p0", 0, "aaaa")], [_chunk("p1", 0, "bbbb")], [_chunk("p2", 0, "cccc")]]
    p1 = cp.next(inputs)
    inputs[0].append(_chunk("p0", 1, "more"))
    inputs[1].append(_chunk("p1", 1, "more"))
    cp.add_output(_chunk("agg", 0, "ans"))
    p2 = cp.next(inputs)
    keys = [k for k, _ in p2.keyed()]
    first_new = keys.index(("out", "p0", 1))
    assert p2.reuse_prefix_tokens == sum(t for _, t in p2.keyed()[:first_new])
    assert p2.reuse_prefix_tokens < p1.tokens  # the rest of the old prompt is not reused
    assert "\n[Model 1]: aaaamore\n[Model 2]: bbbbmore" in p2.render()
    assert p2.messages[-1].role == "assistant" and not p2.messages[-1].closed and p2.continue_final


# -------------------------------------------------------------------- scheduler


def test_scheduler_protocol_errors_and_stale_events():
    s = Scheduler(moa(2), StaircasePolicy(redundancy=0), Query("q"), max_tokens=20)
    start = s.start()
    assert [a.node for a in start] == ["L0.p0", "L0.p1"]
    with pytest.raises(ProtocolError, match="expected chunk 0"):
        s.on(Chunk("L0.p0", 0, 3, 8, "x"), 0.1)
    with pytest.raises(ProtocolError, match="never started"):
        s.on(Chunk("L0.p0", 5, 0, 8, "x"), 0.1)
    with pytest.raises(ProtocolError, match="unknown node"):
        s.on(Finished("zz", 0), 0.1)


def test_scheduler_sets_a_timer_for_the_deadline_policy():
    s = Scheduler(moa(3), DeadlineStaircasePolicy(max_wait_s=0.2, redundancy=0), Query("q"), max_tokens=50)
    s.start(0.0)
    acts = s.on(Chunk("L0.p0", 0, 0, 8, "x"), 0.1)
    assert len(acts) == 1 and acts[0].key == ("agg", 0) and acts[0].delay_s == pytest.approx(0.2)
    acts = s.on(TimerFired(("agg", 0)), 0.3)
    assert len(acts) == 1 and isinstance(acts[0], Generate) and acts[0].node == "agg" and acts[0].step == 0


# ---------------------------------------------------------------------- metrics


def test_request_metrics_from_user_chunks():
    chunks = [(8, 1.0, 1.7), (128, 3.0, 15.7), (64, 16.0, 22.3)]
    m = request_metrics(chunks, arrival_s=0.5, stall_threshold_s=0.5)
    assert m["ttft_s"] == pytest.approx(0.5)
    assert m["e2e_s"] == pytest.approx(21.8)
    assert m["output_tokens"] == 200
    assert m["tpot_s"] == pytest.approx((21.8 - 0.5) / 199)
    assert m["longest_stall_s"] == pytest.approx(1.3)
    assert m["stalls_over_threshold"] == 1
    values, weights = itl_samples(chunks)
    assert sum(weights) == 199


def test_weighted_percentile():
    assert weighted_percentile([1, 2, 3], 50) == 2
    assert weighted_percentile([1.0, 10.0], 50, [99, 1]) == 1.0
    assert weighted_percentile([1.0, 10.0], 99.5, [99, 1]) == 10.0
    assert math.isnan(weighted_percentile([], 50))
