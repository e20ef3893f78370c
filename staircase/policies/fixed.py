"""The fixed policies: the paper's staircase, standard MoA (wait-all), the single model,
and the deadline staircase. Each declares its constructor parameters (``PARAMS``) and
the knobs a search may vary (``KNOBS``); ``registry`` lists them by kind."""

from __future__ import annotations

from typing import Sequence

from ..topology import Node, Topology
from .base import (AGGREGATOR_SCHEDULE, FINAL, LAYOUT, NAME, PAPER_AGGREGATOR_SCHEDULE, PROPOSER_SCHEDULE, REDUNDANCY,
                   SCOPE, STEP, WAIT, WHOLE_ANSWER, ChunkSchedule, ConsumerView, Decision, DecisionKind, Param, Policy,
                   UpstreamView, check_name, knobs_of, params_of)

MAX_WAIT = Param("max_wait_s", "float", 0.5, low=0.0, open_low=True, search=(0.01, 60.0),
                 allowed="a positive number of seconds", help="staircase-deadline: longest wait for the first step")
REPORT_SCHEDULE = Param("report_schedule", "schedule", PAPER_AGGREGATOR_SCHEDULE,
                        help="how the final answer's stream is cut into chunks for the trace")
TOLERANCE = Param("tolerance", "count", 0, search=(0, 8), help="lost inputs wait-all rides out")



class StaircasePolicy(Policy):
    """Consumer step k starts once N - r_k inputs delivered chunk k or finished
    (r_k = r on every step, or on the first step only, by ``scope``; an input that
    failed before chunk k lowers the count it waits for); once the inputs it waits for
    have finished, it generates the rest of its answer in one call."""

    KIND = "staircase"
    SPEC = (PROPOSER_SCHEDULE, AGGREGATOR_SCHEDULE, REDUNDANCY, SCOPE, LAYOUT, NAME)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(
        self,
        proposer_schedule: ChunkSchedule | Sequence[int] = PROPOSER_SCHEDULE.default,
        aggregator_schedule: ChunkSchedule | Sequence[int] = AGGREGATOR_SCHEDULE.default,
        redundancy: int = REDUNDANCY.default,
        scope: str = SCOPE.default,
        layout: str = LAYOUT.default,
        name: str | None = None,
    ):
        self.proposer_schedule = PROPOSER_SCHEDULE.check(proposer_schedule)
        self.aggregator_schedule = AGGREGATOR_SCHEDULE.check(aggregator_schedule)
        self.redundancy = REDUNDANCY.check(redundancy)
        self.scope = SCOPE.check(scope)
        self.layout = LAYOUT.check(layout)
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
    SPEC = StaircasePolicy.SPEC + (MAX_WAIT,)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, max_wait_s: float = MAX_WAIT.default, **kwargs):
        self.max_wait_s = MAX_WAIT.check(max_wait_s)
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
    SPEC = (REPORT_SCHEDULE, TOLERANCE, NAME)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, report_schedule: ChunkSchedule | Sequence[int] = REPORT_SCHEDULE.default,
                 tolerance: int = TOLERANCE.default, name: str = "wait-all"):
        self.report_schedule = REPORT_SCHEDULE.check(report_schedule)
        self.tolerance = TOLERANCE.check(tolerance)
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
    SPEC = (REPORT_SCHEDULE, NAME)
    PARAMS, KNOBS = params_of(SPEC), knobs_of(SPEC)

    def __init__(self, report_schedule: ChunkSchedule | Sequence[int] = REPORT_SCHEDULE.default, name: str = "single"):
        super().__init__(report_schedule, 0, name)

    def plan(self, topology: Topology) -> Topology:
        return topology.only_final()

    def validate_for(self, topology: Topology) -> None:
        return None


