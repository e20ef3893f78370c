"""Hypothesis stateful tests of the scheduler: random valid policies and topologies,
random orders of chunk arrivals, finishes and failures, checked against a simple
reference model of what the scheduler must and must not do."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from adaptive import RandomChunksPolicy
from staircase.policies import (LeadInStaircasePolicy, LoadAwareStaircasePolicy, SmoothStaircasePolicy,
                                StragglerStaircasePolicy, TTFTTargetStaircasePolicy)
from staircase.policies import ChunkSchedule, SinglePolicy, StaircasePolicy, WaitAllPolicy
from staircase.prompts import _keyed
from staircase.scheduler import (Cancel, Chunk, Done, Emit, Failed, Finished, Generate, NextChunk, Query,
                                 Scheduler, SetTimer, TimerFired)
from staircase.topology import mad, moa

schedules = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(lambda s: ChunkSchedule(tuple(s)))
topologies = st.one_of(
    st.builds(moa, proposers=st.integers(1, 5), layers=st.integers(1, 2)),
    st.builds(mad, agents=st.integers(2, 3), rounds=st.integers(1, 2)),
)


@st.composite
def policies(draw, fan_in: int):
    kind = draw(st.sampled_from(["staircase", "staircase", "staircase", "adaptive", "adaptive", "wait-all",
                                 "single", "smooth", "smooth", "straggler", "straggler", "load", "load", "ttft",
                                 "ttft", "lead-in", "lead-in"]))
    common = {"redundancy": draw(st.integers(0, max(0, fan_in - 1))), "scope": draw(st.sampled_from(["first", "every"])),
              "layout": draw(st.sampled_from(["standard", "prefix-cache"])),
              "proposer_schedule": draw(schedules), "aggregator_schedule": draw(schedules)}
    if kind == "smooth":
        low = draw(st.integers(1, 6))
        return SmoothStaircasePolicy(first_chunk=draw(st.integers(1, 12)), slack=draw(st.floats(0.1, 2.0)),
                                     smoothing=draw(st.floats(0.05, 1.0)), min_chunk=low,
                                     max_chunk=draw(st.integers(low, 12)), **common)
    if kind == "straggler":
        return StragglerStaircasePolicy(patience=draw(st.floats(0.0, 3.0)), **common)
    if kind == "load":
        return LoadAwareStaircasePolicy(busy_calls=draw(st.integers(1, 4)), **common)
    if kind == "ttft":
        return TTFTTargetStaircasePolicy(ttft_target_s=draw(st.floats(0.01, 3.0)),
                                         first_token_s=draw(st.floats(0.0, 1.0)), **common)
    if kind == "lead-in":  # zero-input first steps: at once (0 s) or at a time budget
        return LeadInStaircasePolicy(lead_in_s=draw(st.sampled_from([0.0, 0.0, 0.02, 1.0])),
                                     lead_in_tokens=draw(st.integers(1, 12)), **common)
    if kind == "adaptive":
        low = draw(st.integers(1, 8))
        return RandomChunksPolicy(low, draw(st.integers(low, 16)), draw(st.integers(0, 2**16)), redundancy=draw(st.integers(0, max(0, fan_in - 1))),
                                  scope=draw(st.sampled_from(["first", "every"])),
                                  layout=draw(st.sampled_from(["standard", "prefix-cache"])))
    if kind == "staircase":
        return StaircasePolicy(draw(schedules), draw(schedules), draw(st.integers(0, max(0, fan_in - 1))),
                               draw(st.sampled_from(["first", "every"])),
                               draw(st.sampled_from(["standard", "prefix-cache"])))
    if kind == "wait-all":
        return WaitAllPolicy(draw(schedules), tolerance=draw(st.integers(0, max(0, fan_in - 1))))
    return SinglePolicy(draw(schedules))


class SchedulerMachine(RuleBasedStateMachine):
    """The runner side: it turns Generate actions into calls and feeds back events."""

    @initialize(data=st.data())
    def setup(self, data):
        topo = data.draw(topologies)
        self.policy = data.draw(policies(topo.min_fan_in))
        self.max_tokens = data.draw(st.integers(1, 40))
        self.load = 0  # calls in flight on every engine, as the runner would report them (rule load_changes)
        self.timers: dict[tuple, float] = {}  # pending timer key -> when it fires
        self.sched = Scheduler(topo, self.policy, Query("what is two plus two?"), self.max_tokens,
                               load=lambda _node: self.load)
        self.topo = self.sched.topology
        nodes = self.topo.nodes
        # natural answer length of every node (tokens until EOS)
        self.natural = {n.id: data.draw(st.integers(1, 50)) for n in nodes}
        self.calls: dict[str, dict] = {}  # node -> active call
        self.delivered: dict[str, list[tuple[int, str]]] = {n.id: [] for n in nodes}
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        self.cancelled: set[str] = set()
        self.emitted: list[str] = []
        self.prompts: dict[str, list] = {n.id: [] for n in nodes}
        self.done: Done | None = None
        self.now = 0.0
        self.apply(self.sched.start(self.now))

    # ----------------------------------------------------------- reference model
    def lost(self, node) -> int:
        return sum(u in self.failed for u in node.upstream)

    def needed(self, node, step: int) -> int:
        """N - r_k, less the inputs that failed before delivering chunk k."""
        n = len(node.upstream)
        missing = sum(u in self.failed and len(self.delivered[u]) <= step for u in node.upstream)
        return min(n - self.policy.redundancy_at(step), n - missing)

    def input_chunk(self, node, step: int) -> int | None:
        """The input chunk a consumer's step reads (None: the lead-in, from no input)."""
        return self.policy.input_chunk(node, step) if isinstance(self.policy, LeadInStaircasePolicy) else step

    def ready_count(self, node, step: int) -> int:
        return sum(1 for u in node.upstream if u in self.finished or len(self.delivered[u]) > step)

    def apply(self, actions):
        for a in actions:
            assert self.done is None, f"action {a} after Done"
            if isinstance(a, Generate):
                self.check_generate(a)
                # an engine writes at least one token (after a lead-in's EOS the answer goes on)
                natural_left = max(1, self.natural[a.node] - sum(t for t, _ in self.delivered[a.node]))
                self.calls[a.node] = {"gen": a, "produced": 0, "chunks": 0, "bounds": list(a.boundaries),
                                      "end": min(a.max_tokens, natural_left),
                                      "reason": "stop" if natural_left <= a.max_tokens else "length"}
            elif isinstance(a, NextChunk):
                self.check_next_chunk(a)
                self.calls[a.node]["bounds"].append(a.boundary)
            elif isinstance(a, Cancel):
                assert a.node in self.calls, f"cancel of {a.node}, which is not running"
                del self.calls[a.node]
                self.cancelled.add(a.node)
            elif isinstance(a, Emit):
                assert a.node == self.topo.final.id
                self.emitted.append(a.text)
            elif isinstance(a, SetTimer):
                assert isinstance(self.policy, (StragglerStaircasePolicy, TTFTTargetStaircasePolicy,
                                                LeadInStaircasePolicy)), \
                    "only the straggler, TTFT-target and lead-in policies set timers"
                assert a.delay_s >= 0 and a.key not in self.timers
                self.timers[a.key] = self.now + a.delay_s
            elif isinstance(a, Done):
                self.done = a

    def check_generate(self, g: Generate):
        node = self.topo.by_id[g.node]
        assert g.node not in self.calls, f"{g.node} started while running"
        assert g.node not in self.finished and g.node not in self.failed
        produced = sum(t for t, _ in self.delivered[g.node])
        assert g.max_tokens == min(g.max_tokens, self.max_tokens - produced) and g.max_tokens >= 1
        assert list(g.boundaries) == sorted(set(g.boundaries)) and 1 <= g.boundaries[0]
        adaptive = isinstance(self.policy, RandomChunksPolicy)
        if isinstance(self.policy, SmoothStaircasePolicy) and (not node.upstream or g.final_call):
            assert len(g.boundaries) == 1  # the first boundary now, the others as the call goes
            if not node.upstream:
                assert g.boundaries == (min(self.policy.first_chunk, g.max_tokens),)
        elif adaptive:
            state = self.sched.policy_state
            if node.upstream and (g.node, g.step) in state["steps"]:  # a step: one chunk, of the size chosen
                assert g.boundaries == (g.max_tokens,)
                assert g.max_tokens == min(state["steps"][(g.node, g.step)], self.max_tokens - produced)
            else:  # the first boundary now, the others as the call goes
                chosen = state["chunks"][(g.node, g.first_chunk_index)]
                assert g.boundaries == (min(chosen, g.max_tokens),), (g, chosen)
        elif not self.policy.ADAPTIVE_CHUNKS or (node.upstream and not g.final_call):
            assert g.boundaries[-1] == g.max_tokens
        schedule = self.policy.output_schedule(node)
        if node.upstream:
            if isinstance(self.policy, LoadAwareStaircasePolicy) and self.load >= self.policy.busy_calls \
                    and not all(u in self.finished or u in self.failed for u in node.upstream):
                # busy: no step, and a final call only with r inputs left behind, as the staircase allows
                assert g.final_call and self.ready_count(node, g.step) >= self.needed(node, g.step)
                assert sum(u in self.finished for u in node.upstream) >= self.needed(node, g.step)
            early = isinstance(self.policy, TTFTTargetStaircasePolicy) and node.is_final and g.step == 0 \
                and self.ready_count(node, 0) < self.needed(node, 0)
            chunk = self.input_chunk(node, g.step)
            if early:  # past its TTFT deadline the first step goes with any input in hand, never before it
                assert self.now >= self.sched.policy_state[node.id] - 1e-9 and self.ready_count(node, 0) >= 1
            elif chunk is None:  # the lead-in: at its deadline, or once the staircase would start, never before
                assert self.now >= self.sched.policy_state[node.id] - 1e-9 \
                    or self.ready_count(node, 0) >= self.needed(node, 0), (g.node, self.now)
                assert self.lost(node) <= self.policy.tolerance
            elif isinstance(self.policy, StaircasePolicy):
                # never starts step k before N - r_k inputs delivered chunk k (or finished) ...
                assert self.ready_count(node, chunk) >= self.needed(node, chunk), (g.node, g.step)
                assert self.lost(node) <= self.policy.tolerance
            else:
                # ... and wait-all never starts before every input finished
                assert all(u in self.finished or u in self.failed for u in node.upstream)
            if not g.final_call and not adaptive:
                # chunk sizes follow the schedule
                assert g.max_tokens == min(schedule.size(g.step), self.max_tokens - produced)
            assert g.first_chunk_index == len(self.delivered[g.node])
            self.check_prompt(node, g)
        elif not self.policy.ADAPTIVE_CHUNKS:
            assert g.boundaries == schedule.boundaries(0, self.max_tokens)

    def check_next_chunk(self, a: NextChunk):
        call = self.calls.get(a.node)
        assert call is not None and call["gen"].call == a.call, f"next chunk of {a.node}, which is not running"
        g = call["gen"]
        assert call["bounds"][-1] == call["produced"] < a.boundary <= g.max_tokens, (call, a)
        if isinstance(self.policy, SmoothStaircasePolicy):  # sources within its bounds, the others by schedule
            size = a.boundary - call["produced"]
            if self.topo.by_id[a.node].upstream:
                schedule = self.policy.output_schedule(self.topo.by_id[a.node])
                assert size == min(schedule.size(len(self.delivered[a.node])), g.max_tokens - call["produced"])
                return
            assert size == g.max_tokens - call["produced"] or self.policy.min_chunk <= size <= self.policy.max_chunk
            return
        chosen = self.sched.policy_state["chunks"][(a.node, len(self.delivered[a.node]))]
        assert a.boundary - call["produced"] == min(chosen, g.max_tokens - call["produced"])

    def check_prompt(self, node, g: Generate):
        history = self.prompts[node.id]
        if history and self.policy.layout == "prefix-cache":
            prev_prompt, prev_outputs = history[-1]
            own_since = self.delivered[node.id][prev_outputs:]
            prev_keys = prev_prompt.keyed() + [(("out", node.id, prev_outputs + i), t) for i, (t, _) in enumerate(own_since)]
            keys = g.prompt.keyed()
            assert keys[:len(prev_keys)] == prev_keys, "prefix-cache prompt is not append-only"
            prev_text = prev_prompt.render() + "".join(text for _, text in own_since)
            assert g.prompt.render().startswith(prev_text)
            assert g.prompt.reuse_prefix_tokens == sum(t for _, t in prev_keys)
        assert g.prompt.tokens == sum(t for _, t in _keyed(g.prompt.messages))
        history.append((g.prompt, len(self.delivered[node.id])))

    # ---------------------------------------------------------------- the runner
    def active(self) -> list[str]:
        return sorted(self.calls)

    def deliver(self, node_id: str):
        call = self.calls[node_id]
        g: Generate = call["gen"]
        end_of_call = call["end"]
        assert call["chunks"] < len(call["bounds"]), f"{node_id} streams with no next boundary"
        boundary = min(call["bounds"][call["chunks"]], end_of_call)
        tokens = boundary - call["produced"]
        index = len(self.delivered[node_id])
        text = f"<{node_id}#{index}:{tokens}>"
        self.now += 0.01
        self.delivered[node_id].append((tokens, text))
        call["produced"] = boundary
        call["chunks"] += 1
        self.apply(self.sched.on(Chunk(node_id, g.call, index, tokens, text), self.now))
        if boundary == end_of_call and node_id in self.calls and self.calls[node_id] is call:
            reason = call["reason"]
            del self.calls[node_id]
            total = sum(t for t, _ in self.delivered[node_id])
            ends = self.policy.ends_on_stop(self.topo.by_id[node_id], g.step)
            if (reason == "stop" and ends) or g.final_call or total >= self.max_tokens:
                self.finished.add(node_id)
            self.apply(self.sched.on(Finished(node_id, g.call, reason), self.now))

    @precondition(lambda self: self.done is None and self.calls)
    @rule(data=st.data())
    def chunk_arrives(self, data):
        self.deliver(data.draw(st.sampled_from(self.active())))

    @precondition(lambda self: self.done is None and self.calls)
    @rule(data=st.data())
    def node_fails(self, data):
        node_id = data.draw(st.sampled_from(self.active()))
        g = self.calls.pop(node_id)["gen"]
        self.failed.add(node_id)
        self.now += 0.01
        self.apply(self.sched.on(Failed(node_id, g.call, "injected"), self.now))

    @precondition(lambda self: self.done is None and self.timers)
    @rule(data=st.data())
    def timer_fires(self, data):
        key = data.draw(st.sampled_from(sorted(self.timers)))
        self.now = max(self.now, self.timers.pop(key))
        self.apply(self.sched.on(TimerFired(key), self.now))

    @precondition(lambda self: self.done is None)
    @rule(load=st.sampled_from([0, 1, 2, 100]))
    def load_changes(self, load):
        self.load = load

    @precondition(lambda self: self.done is None and self.cancelled)
    @rule(data=st.data())
    def stale_event_is_ignored(self, data):
        node_id = data.draw(st.sampled_from(sorted(self.cancelled)))
        call = self.sched.states[node_id].call
        assume(node_id not in self.calls)
        assert self.sched.on(Chunk(node_id, call, len(self.delivered[node_id]), 1, "late"), self.now) == []

    @precondition(lambda self: self.done is None)
    @rule()
    def run_to_completion(self):
        """Deliver everything in order: a request whose losses stay within r ends ok."""
        for _ in range(10_000):
            if self.done is not None or not self.calls:
                break
            self.deliver(self.active()[0])
        assert self.done is not None, "deadlock: no call running and the request is not done"
        if self.done.outcome == "error":
            final = self.topo.final
            assert final.id in self.failed or any(
                self.lost(n) > self.policy.tolerance for n in self.topo.nodes if n.upstream), self.done.error

    @precondition(lambda self: self.done is not None)
    @rule()
    def events_after_done_are_ignored(self):
        final = self.topo.final.id
        assert self.sched.on(Failed(final, self.sched.states[final].call, "late"), self.now) == []

    # ------------------------------------------------------------- invariants
    @invariant()
    def no_deadlock(self):
        if self.done is None:
            assert self.calls, "no call running and the request is not done"

    @invariant()
    def never_waits_for_more_than_needed(self):
        if self.done is not None or not isinstance(self.policy, StaircasePolicy):
            return
        for node in self.topo.nodes:
            if not node.upstream or node.id in self.calls or node.id in self.finished | self.failed | self.cancelled:
                continue
            step = self.sched.states[node.id].step
            chunk = self.input_chunk(node, step)
            if chunk is None:  # the lead-in waits only for its deadline, with a timer
                assert self.lost(node) > self.policy.tolerance or (node.id, 0) in self.timers, \
                    f"{node.id} waits for its lead-in with no timer"
                continue
            if self.lost(node) > self.policy.tolerance or self.ready_count(node, chunk) < self.needed(node, chunk):
                continue
            if isinstance(self.policy, StragglerStaircasePolicy):  # waits for stragglers until its deadline
                assert (node.id, step) in self.timers, \
                    f"{node.id} waits at step {step} for stragglers with no deadline"
                continue
            if isinstance(self.policy, LoadAwareStaircasePolicy):
                continue  # it may have been busy when last asked: the next input event asks it again
            if isinstance(self.policy, TTFTTargetStaircasePolicy) and node.is_final and step == 0:
                assert (node.id, 0) in self.timers and self.now < self.sched.policy_state[node.id], \
                    f"{node.id} waits for its TTFT deadline with no timer, or past it"
                continue
            raise AssertionError(f"{node.id} waits at step {step} although enough inputs are ready")

    @invariant()
    def user_output_is_the_emitted_chunks(self):
        final = self.topo.final.id
        assert self.emitted == [text for _, text in self.delivered[final]]
        assert self.sched.output_text() == "".join(self.emitted)

    @invariant()
    def delivered_chunks_follow_the_schedule(self):
        for node in self.topo.nodes:
            chunks = self.delivered[node.id]
            if isinstance(self.policy, WaitAllPolicy) and not node.is_final:
                assert len(chunks) <= 1
            if isinstance(self.policy, RandomChunksPolicy):  # sizes within the policy's bounds
                assert all(tokens <= self.policy.high for tokens, _ in chunks)
                continue
            if isinstance(self.policy, SmoothStaircasePolicy) and not node.upstream:  # within its bounds
                if chunks:
                    assert chunks[0][0] <= self.policy.first_chunk
                assert all(tokens <= self.policy.max_chunk for tokens, _ in chunks[1:])
                assert all(tokens >= self.policy.min_chunk for tokens, _ in chunks[1:-1])
                continue
            schedule = self.policy.output_schedule(node)
            for j, (tokens, _) in enumerate(chunks[:-1]):
                if not self.policy.ends_on_stop(node, j):  # a lead-in may stop short; the answer goes on
                    assert tokens <= schedule.size(j), (node.id, j, tokens)
                    continue
                assert tokens == schedule.size(j), (node.id, j, tokens)
            if chunks:
                assert chunks[-1][0] <= schedule.size(len(chunks) - 1)

    @invariant()
    def losses_within_r_never_end_the_request(self):
        if self.done is not None and self.done.outcome == "error":
            assert self.topo.final.id in self.failed or any(
                self.lost(n) > self.policy.tolerance for n in self.topo.nodes if n.upstream)


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
