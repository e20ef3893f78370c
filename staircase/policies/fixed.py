"""The fixed policies: the paper's staircase, standard MoA (wait-all), the single model,
and the deadline staircase. Each declares its constructor parameters (``PARAMS``) and
the knobs a search may vary (``KNOBS``); ``registry`` lists them by kind."""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError
from ..topology import Node, Topology
from .base import (FINAL, LAYOUTS, PAPER_AGGREGATOR_SCHEDULE, PAPER_PROPOSER_SCHEDULE, SCHEDULE_TOKENS, SCOPES, STEP,
                   WAIT, WHOLE_ANSWER, ChunkSchedule, ConsumerView, Decision, DecisionKind, Knob, Policy, UpstreamView,
                   as_schedule, check_choice, check_name, check_redundancy)



class StaircasePolicy(Policy):
    """Consumer step k starts once N - r_k inputs delivered chunk k or finished
    (r_k = r on every step, or on the first step only, by ``scope``; an input that
    failed before chunk k lowers the count it waits for); once the inputs it waits for
    have finished, it generates the rest of its answer in one call."""

    KIND = "staircase"
    PARAMS = ("proposer_schedule", "aggregator_schedule", "redundancy", "scope", "layout", "name")
    KNOBS = (Knob("proposer_schedule", "schedule", *SCHEDULE_TOKENS),
             Knob("aggregator_schedule", "schedule", *SCHEDULE_TOKENS),
             Knob("redundancy", "int", 0, 8), Knob("scope", "choice", choices=SCOPES),
             Knob("layout", "choice", choices=LAYOUTS))

    def __init__(
        self,
        proposer_schedule: ChunkSchedule | Sequence[int] = PAPER_PROPOSER_SCHEDULE,
        aggregator_schedule: ChunkSchedule | Sequence[int] = PAPER_AGGREGATOR_SCHEDULE,
        redundancy: int = 2,
        scope: str = "first",
        layout: str = "prefix-cache",
        name: str | None = None,
    ):
        self.proposer_schedule = as_schedule(proposer_schedule, "proposer_schedule")
        self.aggregator_schedule = as_schedule(aggregator_schedule, "aggregator_schedule")
        self.redundancy = check_redundancy(redundancy)
        self.scope = check_choice("scope", scope, SCOPES)
        self.layout = check_choice("layout", layout, LAYOUTS)
        self.tolerance = self.redundancy
        self.name = check_name(name, f"staircase-{layout}-r{redundancy}")

    def output_schedule(self, node: Node) -> ChunkSchedule:
        return self.aggregator_schedule if node.is_final else self.proposer_schedule

    def redundancy_at(self, step: int) -> int:
        return self.redundancy if (self.scope == "every" or step == 0) else 0

    @staticmethod
    def input_counts(upstream: Sequence[UpstreamView], step: int) -> tuple[int, int, int, int]:
        """(lost, missing, finished, ready) of a consumer's inputs at ``step``, in one
        pass (this runs on every input chunk): lost = failed; missing = failed before
        delivering chunk k (it never comes); ready = finished or delivered chunk k."""
        lost = missing = finished = ready = 0
        for u in upstream:
            if u.failed:
                lost += 1
            if u.finished:
                finished += 1
                ready += 1
            elif u.chunks > step:
                ready += 1  # delivered chunk k, even if it failed later
            elif u.failed:
                missing += 1
        return lost, missing, finished, ready

    def lost_too_many(self, lost: int, inputs: int) -> Decision | None:
        """The FAIL decision when more inputs were lost than the policy tolerates."""
        if lost > self.tolerance:
            return Decision(DecisionKind.FAIL, reason=f"lost {lost} of {inputs} inputs; r={self.tolerance}")
        return None

    def decide(self, view: ConsumerView) -> Decision:
        return self.decide_at(view, view.step)

    def decide_at(self, view: ConsumerView, step: int) -> Decision:
        """The staircase's decision for a consumer whose next step reads chunk ``step``
        of its inputs (the lead-in policy's steps read one chunk behind)."""
        lost, missing, finished, ready = self.input_counts(view.upstream, step)
        n = len(view.upstream)
        if (fail := self.lost_too_many(lost, n)) is not None:
            return fail
        need = min(n - self.redundancy_at(step), n - missing)
        if finished >= need:
            return FINAL
        return STEP if ready >= need else WAIT


class DeadlineStaircasePolicy(StaircasePolicy):
    """Adaptive example: like staircase, but the first step also starts once
    ``max_wait_s`` passed since the first input chunk arrived (any one input)."""

    KIND = "staircase-deadline"
    PARAMS = StaircasePolicy.PARAMS + ("max_wait_s",)
    KNOBS = StaircasePolicy.KNOBS + (Knob("max_wait_s", "float", 0.01, 60.0),)

    def __init__(self, max_wait_s: float = 0.5, **kwargs):
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not max_wait_s > 0:
            raise ConfigError("max_wait_s", max_wait_s, "a positive number of seconds")
        self.max_wait_s = float(max_wait_s)
        kwargs.setdefault("name", f"staircase-deadline-{max_wait_s:g}s")
        super().__init__(**kwargs)

    def decide(self, view: ConsumerView) -> Decision:
        decision = super().decide(view)
        if decision.kind != DecisionKind.WAIT or view.step != 0:
            return decision
        firsts = [u.chunk_end_s[0] for u in view.upstream if u.chunks > 0]
        if not firsts:
            return WAIT
        waited = view.now_s - min(firsts)
        if waited >= self.max_wait_s - 1e-12:
            return STEP
        return Decision(DecisionKind.WAIT, wake_after_s=self.max_wait_s - waited)


class WaitAllPolicy(Policy):
    """Standard MoA: a consumer starts once every input finished; one call per node.
    ``report_schedule`` only sets how the final answer's stream is cut into chunks for
    the trace (it does not change when anything starts)."""

    KIND = "wait-all"
    PARAMS = ("report_schedule", "tolerance", "name")
    KNOBS = (Knob("tolerance", "int", 0, 8),)

    def __init__(self, report_schedule: ChunkSchedule | Sequence[int] = PAPER_AGGREGATOR_SCHEDULE,
                 tolerance: int = 0, name: str = "wait-all"):
        self.report_schedule = as_schedule(report_schedule, "report_schedule")
        self.tolerance = check_redundancy(tolerance, "tolerance")
        self.layout = "standard"
        self.name = check_name(name, self.KIND)

    def output_schedule(self, node: Node) -> ChunkSchedule:
        # inputs are read only when complete: one chunk per intermediate answer
        return self.report_schedule if node.is_final else WHOLE_ANSWER

    def decide(self, view: ConsumerView) -> Decision:
        if view.lost > self.tolerance:
            return Decision(DecisionKind.FAIL,
                            reason=f"lost {view.lost} of {len(view.upstream)} inputs; tolerance={self.tolerance}")
        if all(u.finished or u.failed for u in view.upstream):
            return FINAL
        return WAIT


class SinglePolicy(WaitAllPolicy):
    """One model (the final node's engine) answers the query alone."""

    KIND = "single"
    PARAMS = ("report_schedule", "name")
    KNOBS = ()

    def __init__(self, report_schedule: ChunkSchedule | Sequence[int] = PAPER_AGGREGATOR_SCHEDULE, name: str = "single"):
        super().__init__(report_schedule, 0, name)

    def plan(self, topology: Topology) -> Topology:
        return topology.only_final()

    def validate_for(self, topology: Topology) -> None:
        return None


