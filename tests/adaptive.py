"""A test policy of the adaptive protocol, shared by the scheduler's stateful tests,
the cross-runner tests and the live tests: the staircase's decisions, with every step
size and every chunk boundary drawn as the request goes, from per-request state (a
seeded generator, and the sizes it chose, which the tests check against the traces)."""

from __future__ import annotations

import random
import zlib

from staircase.policies import Decision, DecisionKind, StaircasePolicy, StreamView


class RandomChunksPolicy(StaircasePolicy):
    ADAPTIVE_CHUNKS = True

    def __init__(self, low: int, high: int, seed: int = 0, **kwargs):
        kwargs.setdefault("name", f"random-chunks-{low}-{high}")
        super().__init__(**kwargs)
        self.low, self.high, self.seed = low, high, seed
        self.states: list[dict] = []  # every request's state, for the tests to read

    def new_state(self, topology):
        request = len(self.states)
        state = {"rng": {n.id: random.Random(self.seed * 1_000_003 + request * 7919 + zlib.crc32(n.id.encode()))
                         for n in topology.nodes}, "chunks": {}, "steps": {}}  # a generator per node: draws in
        self.states.append(state)  # the node's own order, whatever order the runner's events come in
        return state

    def chunk_tokens(self, view: StreamView) -> int:
        assert 0 <= view.call_tokens < view.call_max_tokens and view.nodes[view.node.id].tokens == view.tokens
        size = view.state["rng"][view.node.id].randint(self.low, self.high)
        view.state["chunks"][(view.node.id, view.chunk)] = size
        return size

    def decide(self, view):
        decision = super().decide(view)
        if decision.kind != DecisionKind.STEP:
            return decision
        size = view.state["rng"][view.node.id].randint(self.low, self.high)
        view.state["steps"][(view.node.id, view.step)] = size
        return Decision(DecisionKind.STEP, tokens=size)


class ScheduleAsYouGoPolicy(StaircasePolicy):
    """The fixed staircase through the adaptive protocol: each chunk and step sized, as
    it comes, by the schedule. It must run exactly as ``StaircasePolicy`` does."""

    ADAPTIVE_CHUNKS = True

    def decide(self, view):
        decision = super().decide(view)
        if decision.kind != DecisionKind.STEP:
            return decision
        return Decision(DecisionKind.STEP, tokens=self.output_schedule(view.node).size(view.step))
