"""Adaptive staircase policies: they watch the streams of the request (token rates,
the spread of input arrivals) and the load on the engines, through the protocol of
``staircase.policies.base`` (``new_state``, ``chunk_tokens`` with ``ADAPTIVE_CHUNKS``,
``Decision.tokens``, ``view.load``), so the simulator and the live runner run them as
they are.

- ``SmoothStaircasePolicy`` (``staircase-smooth``): sizes each source's next chunk so
  that it arrives while the consumer is still emitting its current step (the rates
  seen so far in this request), so the consumer's next step has its context when it
  needs it: a stream without the paper schedule's long stall after the first token.
- ``StragglerStaircasePolicy`` (``staircase-straggler``): waits for every input up to
  a deadline set by the spread of the inputs' arrivals it has seen, then goes with
  those in hand, never with fewer than N - r.
- ``LoadAwareStaircasePolicy`` (``staircase-load``): the staircase while the
  consumer's engine is lightly loaded; wait-all (one call, one queue wait) once the
  calls in flight on it reach ``busy_calls``.
- ``TTFTTargetStaircasePolicy`` (``staircase-ttft``): a TTFT target per request; the
  final node's first step starts as late as the target allows, with all the context
  delivered by then (the first chunk commits the answer: ``staircase quality``'s probe).
- ``LeadInStaircasePolicy`` (``staircase-lead-in``): the final node's first step, a
  short lead-in, from the query alone (or at a time budget with what has arrived); the
  proposals are read in its later steps, as they stream.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..topology import Node, Topology
from .base import (FINAL, STEP, WAIT, ChunkSchedule, ConsumerView, Decision, DecisionKind, Param, StreamView,
                   UpstreamView, knobs_of, params_of)
from .fixed import StaircasePolicy


# The adaptive kinds' own parameters: what the constructors accept (low..high), what a
# search tries (search), the default; the policy config's JSON Schema is written from them.
FIRST_CHUNK = Param("first_chunk", "int", 8, 1, 1 << 20, search=(1, 256), help="staircase-smooth: chunk 0's tokens")
SLACK = Param("slack", "float", 0.8, 1e-3, 100.0, search=(0.1, 2.0),
              help="staircase-smooth: a chunk's share of the consumer's current step")
SMOOTHING = Param("smoothing", "float", 0.5, 1e-3, 1.0, search=(0.05, 1.0),
                  help="staircase-smooth: the weight of the newest rate observed")
MIN_CHUNK = Param("min_chunk", "int", 2, 1, 1 << 20, search=(1, 64), help="staircase-smooth: the smallest chunk")
MAX_CHUNK = Param("max_chunk", "int", 256, 1, 1 << 20, search=(8, 4096), help="staircase-smooth: the largest chunk")
PATIENCE = Param("patience", "float", 1.0, 0.0, 1e6, search=(0.0, 8.0),
                 help="staircase-straggler: how long past the inputs' spread it waits")
BUSY_CALLS = Param("busy_calls", "int", 16, 1, 1 << 30, search=(1, 4096),
                   help="staircase-load: calls in flight on the consumer's engine from which it waits for all")
TTFT_TARGET = Param("ttft_target_s", "float", 1.0, 1e-3, 1e6, search=(0.05, 30.0),
                    help="staircase-ttft: each request's TTFT target (the first step reads all it can within it)")
FIRST_TOKEN = Param("first_token_s", "float", 0.1, 0.0, 1e6, search=(0.0, 5.0),
                    help="staircase-ttft: the first token's expected delay after its step starts")
LEAD_IN_S = Param("lead_in_s", "float", 0.0, 0.0, 1e6, search=(0.0, 30.0),
                  help="staircase-lead-in: when the final node's lead-in step starts at the latest, seconds after "
                       "the request (0: at once, from the query alone; earlier when N - r first chunks are in)")
LEAD_IN_TOKENS = Param("lead_in_tokens", "int", 16, 1, 1 << 20, search=(1, 256),
                       help="staircase-lead-in: the lead-in step's tokens")


def after_request_start(view: ConsumerView, offset_s: float) -> float:
    """``offset_s`` after the request's first source call was sent (after now, before any
    was), fixed the first time the consumer asks: kept in the request's policy state under
    the consumer's id (the TTFT-target and lead-in deadlines)."""
    if view.node.id not in view.state:
        sent = [u.sent_s for u in (view.nodes or {}).values() if u.node.is_source and u.sent_s >= 0]
        view.state[view.node.id] = (min(sent) if sent else view.now_s) + offset_s
    return view.state[view.node.id]


SMOOTH_AGGREGATOR_SCHEDULE = (8, 16, 32, 64, 128)


class SmoothStaircasePolicy(StaircasePolicy):
    """The staircase with source chunks sized from the rates seen in this request.

    A source's chunk j (j >= 1) feeds its consumer's step j; it should end while the
    consumer still emits step j - 1, whose length is the consumer's schedule size
    ``s`` times the consumer's observed seconds per token (its last steps, call
    overhead and prefill included). So the chunk is ``slack * s * consumer_s_per_token
    / source_s_per_token`` tokens (before any rate is seen the two are taken as equal),
    within ``[min_chunk, max_chunk]``; chunk 0 is ``first_chunk``. Rates are
    exponential averages (``smoothing``: the weight of the newest observation).
    Consumers' steps follow their schedules as in the staircase; the aggregator's
    default schedule doubles (8, 16, 32, 64, 128): with the paper's (8, 128, 128) and
    short answers, step 1 is already the final call and reads a few tokens of each
    input (live, 128-token answers: 14 tokens per proposer, then the inputs are
    cancelled)."""

    KIND = "staircase-smooth"
    ADAPTIVE_CHUNKS = True
    SPEC = StaircasePolicy.SPEC + (FIRST_CHUNK, SLACK, SMOOTHING, MIN_CHUNK, MAX_CHUNK)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, first_chunk: int = FIRST_CHUNK.default, slack: float = SLACK.default,
                 smoothing: float = SMOOTHING.default, min_chunk: int = MIN_CHUNK.default,
                 max_chunk: int = MAX_CHUNK.default, **kwargs):
        # steps that double: its final call (the rest of the answer) comes late enough to read most of the inputs
        kwargs.setdefault("aggregator_schedule", SMOOTH_AGGREGATOR_SCHEDULE)
        self.first_chunk = FIRST_CHUNK.check(first_chunk)
        self.slack = SLACK.check(slack)
        self.smoothing = SMOOTHING.check(smoothing)
        self.min_chunk = MIN_CHUNK.check(min_chunk)
        self.max_chunk = MAX_CHUNK.check(max_chunk)
        if self.min_chunk > self.max_chunk:
            raise ConfigError("min_chunk", min_chunk, f"at most max_chunk ({max_chunk})")
        kwargs.setdefault("name", f"staircase-smooth-r{kwargs.get('redundancy', 2)}")
        super().__init__(**kwargs)

    def new_state(self, topology: Topology) -> dict:
        consumers = {n.id: next((d for d in topology.nodes if n.id in d.upstream), None) for n in topology.nodes}
        return {"consumer": consumers, "seen": {}, "s_per_token": {}, "step_seen": {}}

    def chunk_tokens(self, view: StreamView) -> int:
        consumer = view.state["consumer"].get(view.node.id)
        if not view.node.is_source or consumer is None:
            return super().chunk_tokens(view)
        if view.chunk == 0:
            return self.first_chunk
        source = self._rate(view.state, view.nodes[view.node.id])
        reader = view.state["s_per_token"].get(consumer.id)
        ratio = reader / source if reader is not None and source else 1.0
        size = round(self.slack * self.output_schedule(consumer).size(view.chunk - 1) * ratio)
        return max(self.min_chunk, min(self.max_chunk, size))

    def decide(self, view: ConsumerView) -> Decision:
        if view.nodes is not None and view.step > 0:
            self._step_rate(view.state, view.nodes[view.node.id], view.step)
        return super().decide(view)

    def _rate(self, state: dict, node: UpstreamView) -> float | None:
        """A source's seconds per token between chunk ends, averaged (its first chunk,
        queue and prefill included, is left out)."""
        key = node.node.id
        seen = state["seen"].get(key, 1)
        if node.chunks > seen:
            ends, sizes = node.chunk_end_s, node.chunk_sizes
            avg = state["s_per_token"].get(key)
            for i in range(seen, node.chunks):
                x = (ends[i] - ends[i - 1]) / sizes[i]
                avg = x if avg is None else avg + self.smoothing * (x - avg)
            state["s_per_token"][key] = avg
            state["seen"][key] = node.chunks
        return state["s_per_token"].get(key)

    def _step_rate(self, state: dict, node: UpstreamView, step: int) -> None:
        """A consumer's seconds per token over its last step (sent to its end: call
        overhead, prefill and decode), averaged; once per step."""
        key = node.node.id
        if state["step_seen"].get(key, 0) >= step or not node.chunks or node.sent_s < 0:
            return
        state["step_seen"][key] = step
        x = (node.chunk_end_s[-1] - node.sent_s) / node.chunk_sizes[-1]
        avg = state["s_per_token"].get(key)
        state["s_per_token"][key] = x if avg is None else avg + self.smoothing * (x - avg)


SAME_STEP_S = 1e-3  # the straggler policy's least wait: what separates chunks of one engine step, live or simulated


class StragglerStaircasePolicy(StaircasePolicy):
    """Step k waits for every input's chunk k, but not forever: once N - r inputs
    delivered it (at t_m, the (N - r)-th arrival; t_1 the first), it waits until
    ``t_m + patience * (t_m - t_1)``, the spread seen so far (at least ``SAME_STEP_S``), then goes with the
    inputs in hand (a final call cancels the stragglers). ``redundancy`` is the most it
    leaves behind, at every step (``scope`` ``every``, the default) or the first."""

    KIND = "staircase-straggler"
    SPEC = StaircasePolicy.SPEC + (PATIENCE,)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, patience: float = PATIENCE.default, **kwargs):
        self.patience = PATIENCE.check(patience)
        kwargs.setdefault("scope", "every")
        kwargs.setdefault("redundancy", 1)
        kwargs.setdefault("name", f"staircase-straggler-r{kwargs['redundancy']}")
        super().__init__(**kwargs)

    def new_state(self, topology: Topology) -> dict:
        return {}  # (consumer, step) -> its deadline

    def decide(self, view: ConsumerView) -> Decision:
        step, upstream = view.step, view.upstream
        lost, missing, finished, ready = self.input_counts(upstream, step)
        if (fail := self.lost_too_many(lost, len(upstream))) is not None:
            return fail
        alive = len(upstream) - missing  # inputs whose chunk k was or may be delivered
        if ready >= alive:  # everyone in: as the staircase with r = 0
            return FINAL if finished >= alive else STEP
        need = min(len(upstream) - self.redundancy_at(step), alive)
        if ready < need:
            return WAIT
        if view.now_s >= self._deadline(view, need) - 1e-12:  # go with those in hand, as the staircase with r
            return FINAL if finished >= need else STEP
        return Decision(DecisionKind.WAIT, wake_after_s=self._deadline(view, need) - view.now_s)

    def _deadline(self, view: ConsumerView, need: int) -> float:
        """Set once per (consumer, step), when ``need`` inputs are in: later arrivals never move it."""
        key = (view.node.id, view.step)
        if key not in view.state:
            step = view.step
            times = sorted(u.chunk_end_s[step] if u.chunks > step else u.chunk_end_s[-1] if u.chunks else view.now_s
                           for u in view.upstream if u.finished or u.chunks > step)
            # at least SAME_STEP_S: chunks that end in one engine step (no spread) all come in before it goes
            view.state[key] = times[need - 1] + max(self.patience * (times[need - 1] - times[0]), SAME_STEP_S)
        return view.state[key]


class LoadAwareStaircasePolicy(StaircasePolicy):
    """The staircase while the consumer's engine has fewer than ``busy_calls`` calls in
    flight (every request's, as the runner counts them: ``view.load``); at or above
    it, wait-all for that step on: no more steps, one final call once every input it
    waits for finished, so a loaded engine queues one call per request, not one per
    step. Without a load signal it is the staircase."""

    KIND = "staircase-load"
    SPEC = StaircasePolicy.SPEC + (BUSY_CALLS,)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, busy_calls: int = BUSY_CALLS.default, **kwargs):
        self.busy_calls = BUSY_CALLS.check(busy_calls)
        kwargs.setdefault("name", f"staircase-load-r{kwargs.get('redundancy', 2)}")
        super().__init__(**kwargs)

    def busy(self, view: ConsumerView) -> bool:
        return view.load is not None and view.load(view.node.id) >= self.busy_calls

    def decide(self, view: ConsumerView) -> Decision:
        decision = super().decide(view)
        if decision.kind is not DecisionKind.STEP or not self.busy(view):
            return decision
        if all(u.finished or u.failed for u in view.upstream):
            return FINAL
        return WAIT  # asked again as inputs arrive or finish


TTFT_PROPOSER_SCHEDULE = (8, 16, 32, 64, 128, 256)


class TTFTTargetStaircasePolicy(StaircasePolicy):
    """The deadline policy turned around: a TTFT target per request, and the most
    context that fits it. The final node's first step waits, past the staircase's
    readiness, until ``start + ttft_target_s - first_token_s`` (``start``: when the
    request's source calls were sent; ``first_token_s``: the expected time from the
    final node's call to its first token, prefill included), then reads every input
    chunk delivered by then. Reached with fewer than N - r inputs in, it goes with any
    input in hand; with every input finished earlier, it goes then. Other consumers and
    later steps are the staircase's. Its default proposer schedule doubles
    (8, 16, ... 256) so that waiting buys context in small steps."""

    KIND = "staircase-ttft"
    SPEC = StaircasePolicy.SPEC + (TTFT_TARGET, FIRST_TOKEN)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, ttft_target_s: float = TTFT_TARGET.default, first_token_s: float = FIRST_TOKEN.default,
                 **kwargs):
        self.ttft_target_s = TTFT_TARGET.check(ttft_target_s)
        self.first_token_s = FIRST_TOKEN.check(first_token_s)
        kwargs.setdefault("proposer_schedule", TTFT_PROPOSER_SCHEDULE)
        kwargs.setdefault("name", f"staircase-ttft-{ttft_target_s:g}s-r{kwargs.get('redundancy', 2)}")
        super().__init__(**kwargs)

    def new_state(self, topology: Topology) -> dict:
        return {}  # final node id -> its first step's deadline

    def decide(self, view: ConsumerView) -> Decision:
        decision = super().decide(view)
        if view.step != 0 or not view.node.is_final or decision.kind in (DecisionKind.FAIL, DecisionKind.FINAL):
            return decision
        deadline = self._deadline(view)
        if view.now_s < deadline - 1e-12:
            return Decision(DecisionKind.WAIT, wake_after_s=deadline - view.now_s)  # more context fits
        if decision.kind is DecisionKind.STEP or any(u.chunks for u in view.upstream):
            return STEP
        return WAIT

    def _deadline(self, view: ConsumerView) -> float:
        return after_request_start(view, self.ttft_target_s - self.first_token_s)


class LeadInStaircasePolicy(StaircasePolicy):
    """The final node starts its answer before the staircase would: its first step, a
    lead-in of ``lead_in_tokens``, starts ``lead_in_s`` after the request's source calls
    were sent (0: at once, from the query alone; redundancy up to the fan-in for that
    step), or as soon as N - r inputs delivered their first chunk, whichever comes first,
    and reads whatever has arrived by then. Its later steps are the staircase's, one
    chunk behind: step k + 1 reads chunk k of N - r inputs (``redundancy`` is what the
    request tolerates losing, and what those steps leave behind). A lead-in written from
    no input gets the prompt's lead-in round (``staircase.prompts.LEAD_IN_ROUND``): restate
    the question, keep the answer for when the responses arrive, so the first tokens do
    not commit it. Other consumers are the staircase's."""

    KIND = "staircase-lead-in"
    SPEC = StaircasePolicy.SPEC + (LEAD_IN_S, LEAD_IN_TOKENS)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, lead_in_s: float = LEAD_IN_S.default, lead_in_tokens: int = LEAD_IN_TOKENS.default, **kwargs):
        self.lead_in_s = LEAD_IN_S.check(lead_in_s)
        self.lead_in_tokens = LEAD_IN_TOKENS.check(lead_in_tokens)
        kwargs.setdefault("name", f"staircase-lead-in-{lead_in_s:g}s-r{kwargs.get('redundancy', 2)}")
        super().__init__(**kwargs)
        self._final_schedule = ChunkSchedule((self.lead_in_tokens, *self.aggregator_schedule.sizes))

    def output_schedule(self, node: Node) -> ChunkSchedule:
        return self._final_schedule if node.is_final else self.proposer_schedule

    def input_chunk(self, node: Node, step: int) -> int | None:
        """The input chunk ``node``'s step reads (None: the lead-in, which needs none)."""
        if not node.is_final:
            return step
        return None if step == 0 else step - 1

    def ends_on_stop(self, node: Node, step: int) -> bool:
        """A lead-in that stops (EOS) is the answer's opening, not all of it: step 1 follows."""
        return self.input_chunk(node, step) is not None

    def new_state(self, topology: Topology) -> dict:
        return {}  # final node id -> its lead-in's deadline

    def decide(self, view: ConsumerView) -> Decision:
        chunk = self.input_chunk(view.node, view.step)
        if chunk is not None:
            return self.decide_at(view, chunk)
        decision = self.decide_at(view, 0)  # FAIL, FINAL (every input finished) or STEP: as the staircase
        if decision.kind is not DecisionKind.WAIT:
            return decision
        deadline = self.deadline(view)
        if view.now_s >= deadline - 1e-12:
            return STEP
        return Decision(DecisionKind.WAIT, wake_after_s=deadline - view.now_s)

    def deadline(self, view: ConsumerView) -> float:
        """When the lead-in starts at the latest: ``lead_in_s`` after the first source call was sent."""
        return after_request_start(view, self.lead_in_s)


ADAPTIVE_POLICIES = (SmoothStaircasePolicy, StragglerStaircasePolicy, LoadAwareStaircasePolicy,
                     TTFTTargetStaircasePolicy, LeadInStaircasePolicy)
