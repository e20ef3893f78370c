"""Chunk schedules and policies.

A policy is the small object the scheduler consults: how a source node's stream is
cut into chunks, how many tokens a consumer's next step generates, and whether a
consumer may start its next step now (``decide``). Baselines are policies too, so
every comparison runs through one code path:

- ``StaircasePolicy``: the paper's technique (schedules, redundancy r and its scope,
  prompt layout).
- ``WaitAllPolicy``: standard MoA; a consumer starts once all its inputs finished.
- ``SinglePolicy``: the final node answers the query alone.
- ``DeadlineStaircasePolicy``: an adaptive example; it also starts the first step
  when it has waited ``max_wait_s`` since the first input chunk arrived.

The protocol lets a policy adapt as a request goes:

- ``decide(ConsumerView) -> Decision``: one decision, which for a step carries the
  step's size (``Decision.tokens``; absent: the schedule's size for that step).
- ``new_state(topology)``: state of the policy's own for one request (rates seen so
  far, ...); every view carries it as ``state``, so one policy object serves every
  request.
- ``view.load(node_id)``: calls in flight (sent, not ended; every request's) on the
  engine serving that node, as the runner counts them: the load a policy adds to.
- ``chunk_tokens(StreamView) -> int``: the size of a streaming call's next chunk. A
  policy with ``ADAPTIVE_CHUNKS = True`` is asked when each chunk is reached, so the
  boundaries of a call are set while it streams (the scheduler's ``NextChunk``
  action); otherwise all of a call's boundaries are fixed when it starts, from
  ``output_schedule`` (the runners' fast path).

Views show every node of the request (``nodes``), with their chunk times and sizes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Mapping, Protocol, Sequence

from .errors import ConfigError
from .topology import Node, Topology

LAYOUTS = ("standard", "prefix-cache", "session")
# ``session``: the prefix-cache layout's prompts, a consumer's steps carried as one streaming-input session on
# engines that keep a request open for more input (vLLM's in-process engine): each step sends only the tokens
# its prompt adds, the KV of the earlier steps is kept, nothing is re-prefilled (``staircase.prompts``)
CALL_LAYOUTS = ("standard", "prefix-cache")  # a new engine call per step: what ``staircase`` expands to
SCOPES = ("first", "every")
PAPER_PROPOSER_SCHEDULE = (8, 128, 256)
PAPER_AGGREGATOR_SCHEDULE = (8, 128, 128)


@dataclass(frozen=True)
class ChunkSchedule:
    """Chunk sizes in tokens; chunk k has ``sizes[k]`` tokens and the last size repeats."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ConfigError("schedule", self.sizes, "a non-empty list of positive token counts, e.g. 8,128,256")
        for s in self.sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
                raise ConfigError("schedule", tuple(self.sizes), "positive integer token counts, e.g. 8,128,256")

    @classmethod
    def parse(cls, text: str | Sequence[int], field: str = "schedule") -> "ChunkSchedule":
        """Parse ``"8,128,256"`` (or a sequence of ints); errors name ``field``."""
        if isinstance(text, str):
            parts = [p.strip() for p in text.replace("/", ",").split(",") if p.strip()]
            try:
                sizes = tuple(int(p) for p in parts)
            except ValueError:
                raise ConfigError(field, text, "comma-separated positive integers, e.g. 8,128,256") from None
        else:
            sizes = tuple(text)
        try:
            return cls(sizes)
        except ConfigError as err:
            raise ConfigError(field, text, err.allowed) from None

    def size(self, index: int) -> int:
        return self.sizes[index] if index < len(self.sizes) else self.sizes[-1]

    def boundaries(self, start_index: int, max_tokens: int) -> tuple[int, ...]:
        """Cumulative token counts, within one call that begins at chunk ``start_index``,
        at which chunks end; the last boundary is ``max_tokens``."""
        out: list[int] = []
        total = 0
        k = start_index
        while total < max_tokens:
            total = min(total + self.size(k), max_tokens)
            out.append(total)
            k += 1
        return tuple(out)

    def __str__(self) -> str:
        return ",".join(map(str, self.sizes))


WHOLE_ANSWER = ChunkSchedule((1 << 30,))


class UpstreamView(Protocol):
    """What a consumer knows of one of its inputs (the scheduler's node state
    satisfies this; policies only read it)."""

    node: Node
    chunks: int  # chunks delivered so far
    tokens: int
    finished: bool  # answer complete (not failed, not cancelled)
    failed: bool
    chunk_end_s: Sequence[float]  # time each chunk was delivered
    chunk_sizes: Sequence[int]  # tokens of each chunk delivered
    sent_s: float  # when the node's current (or last) call was sent; -1 before any


@dataclass(slots=True)
class ConsumerView:
    """What a policy sees when it decides a consumer's next step."""

    node: Node
    step: int  # index of the step about to be decided
    now_s: float
    own_tokens: int
    upstream: Sequence[UpstreamView]
    state: object = None  # this request's policy state (``Policy.new_state``)
    nodes: Mapping[str, UpstreamView] | None = None  # every node of the request, by id
    load: Callable[[str], int] | None = None  # node id -> calls in flight on its engine (every request's)

    @property
    def lost(self) -> int:
        return sum(1 for u in self.upstream if u.failed)


@dataclass(slots=True)
class StreamView:
    """What a policy sees when it sizes the next chunk of a streaming call."""

    node: Node
    chunk: int  # index of the chunk to size, over the node's whole answer
    now_s: float
    tokens: int  # the node's output tokens so far (all its calls)
    call_tokens: int  # of them, in this call
    call_max_tokens: int  # this call's limit: a boundary beyond it is cut to it
    state: object
    nodes: Mapping[str, UpstreamView]
    load: Callable[[str], int] | None = None  # node id -> calls in flight on its engine (every request's)


class DecisionKind(StrEnum):
    """What a policy answers for a consumer's next step (string-valued: JSON-friendly,
    equal to the plain strings)."""

    WAIT = "wait"  # not yet (optionally with a timer)
    STEP = "step"  # start the next step, of the policy's step size
    FINAL = "final"  # generate the rest of the answer in one call
    FAIL = "fail"  # too many inputs lost: end the request


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    wake_after_s: float | None = None  # for WAIT: ask for a timer
    reason: str = ""
    tokens: int | None = None  # for STEP: the step's size (None: the schedule's size for this step)


WAIT = Decision(DecisionKind.WAIT)
STEP = Decision(DecisionKind.STEP)
FINAL = Decision(DecisionKind.FINAL)


@dataclass(frozen=True)
class Knob:
    """A policy parameter a search may vary: ``int``/``float`` in [low, high],
    ``choice`` among ``choices``, or ``schedule`` (chunk sizes, each in [low, high])."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def check(self, value: object) -> None:
        """Raise ConfigError (naming the knob) when ``value`` is outside the knob's range."""
        if self.kind == "choice":
            ok = value in self.choices
            allowed = ", ".join(map(str, self.choices))
        else:
            values = list(value) if self.kind == "schedule" and not isinstance(value, str) else [value]
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and (self.kind != "int" or v == int(v))
                     and (self.low is None or v >= self.low) and (self.high is None or v <= self.high)
                     for v in values) and bool(values)
            allowed = f"{self.kind} values in [{self.low}, {self.high}]"
        if not ok:
            raise ConfigError(self.name, value, allowed)


@dataclass(frozen=True)
class PolicyConfig:
    """A policy as data: its registry ``kind`` and constructor parameters (JSON values,
    lists as tuples). Frozen and hashable, so a search can store, hash and rebuild a
    candidate; ``build()`` makes the policy, ``Policy.config()`` gives it back."""

    kind: str
    params: tuple[tuple[str, object], ...]

    @classmethod
    def of(cls, kind: str, **params) -> "PolicyConfig":
        if kind not in POLICY_KINDS:
            raise ConfigError("policy.kind", kind, ", ".join(POLICY_KINDS))
        unknown = sorted(set(params) - set(POLICY_KINDS[kind].PARAMS))
        if unknown:
            raise ConfigError(f"policy.{unknown[0]}", params[unknown[0]],
                              f"parameters of {kind}: {', '.join(POLICY_KINDS[kind].PARAMS)}")
        frozen = {k: tuple(v.sizes) if isinstance(v, ChunkSchedule) else tuple(v) if isinstance(v, (list, tuple)) else v
                  for k, v in params.items()}
        return cls(kind, tuple(sorted(frozen.items())))

    @classmethod
    def from_dict(cls, raw: dict) -> "PolicyConfig":
        """From ``to_dict()`` or a run's recorded ``policies`` entry (also the class-name
        kinds older runs recorded); keys that are not parameters are ignored."""
        if not isinstance(raw, dict):
            raise ConfigError("policy", raw, "an object with a kind and its parameters")
        kind = _LEGACY_KINDS.get(raw.get("kind"), raw.get("kind"))
        if kind not in POLICY_KINDS:
            raise ConfigError("policy.kind", raw.get("kind"), ", ".join(POLICY_KINDS))
        return cls.of(kind, **{k: raw[k] for k in POLICY_KINDS[kind].PARAMS if k in raw})

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params}}

    def key(self) -> str:
        """A stable hash of the config (the same on every machine and run)."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def build(self) -> "Policy":
        return POLICY_KINDS[self.kind](**{k: list(v) if isinstance(v, tuple) else v for k, v in self.params})


class Policy(ABC):
    """What the scheduler asks; subclasses define the answers."""

    name: str
    layout: str
    tolerance: int  # upstream nodes a consumer may lose before the request fails

    def plan(self, topology: Topology) -> Topology:
        """The topology this policy runs (``single`` keeps only the final node)."""
        return topology

    def validate_for(self, topology: Topology) -> None:
        fan_in = topology.min_fan_in
        if fan_in and self.tolerance >= fan_in:
            raise ConfigError("redundancy", self.tolerance, f"0 <= r < {fan_in} (the inputs of each consumer)")

    @abstractmethod
    def output_schedule(self, node: Node) -> ChunkSchedule:
        """Chunk sizes of ``node``'s output as its readers (or the user) receive it."""

    ADAPTIVE_CHUNKS = False  # True: chunk boundaries are asked for (chunk_tokens) while a call streams

    def new_state(self, topology: Topology) -> object:
        """This policy's state for one request (views carry it as ``state``); none by default."""
        return None

    def chunk_tokens(self, view: StreamView) -> int:
        """Size of chunk ``view.chunk`` of a streaming call (asked only by policies with
        ``ADAPTIVE_CHUNKS``; the others' boundaries come from ``output_schedule``)."""
        return self.output_schedule(view.node).size(view.chunk)

    @abstractmethod
    def decide(self, view: ConsumerView) -> Decision:
        """May this consumer start step ``view.step`` now (``STEP``, of ``tokens``), or
        generate the rest (``FINAL``), wait, or fail?"""

    KIND: str = ""
    PARAMS: tuple[str, ...] = ()  # constructor parameters, as attributes of the same names
    KNOBS: tuple[Knob, ...] = ()  # the parameters a search may vary, with their ranges

    def config(self) -> PolicyConfig:
        """This policy as data (``PolicyConfig.build()`` makes an equal one)."""
        return PolicyConfig.of(self.KIND, **{k: getattr(self, k) for k in self.PARAMS})

    def describe(self) -> dict:
        """What runs record: the config (``PolicyConfig.from_dict`` reads it back) plus
        the derived ``layout`` and ``tolerance``."""
        return self.config().to_dict() | {"name": self.name, "layout": self.layout, "tolerance": self.tolerance}


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(field, value, ", ".join(allowed))
    return value


def _check_redundancy(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("redundancy", value, "an integer >= 0 and below the number of proposers")
    return value


SCHEDULE_TOKENS = (1, 4096)  # a chunk size a search may try, in tokens


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
        self.proposer_schedule = _as_schedule(proposer_schedule, "proposer_schedule")
        self.aggregator_schedule = _as_schedule(aggregator_schedule, "aggregator_schedule")
        self.redundancy = _check_redundancy(redundancy)
        self.scope = _check_choice("scope", scope, SCOPES)
        self.layout = _check_choice("layout", layout, LAYOUTS)
        self.tolerance = self.redundancy
        self.name = name or f"staircase-{layout}-r{redundancy}"

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
        step = view.step
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
        if not max_wait_s > 0:
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
        self.report_schedule = _as_schedule(report_schedule, "aggregator_schedule")
        self.tolerance = _check_redundancy(tolerance)
        self.layout = "standard"
        self.name = name

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


def _as_schedule(value: ChunkSchedule | Sequence[int] | str, field: str) -> ChunkSchedule:
    return value if isinstance(value, ChunkSchedule) else ChunkSchedule.parse(value, field)


BASE_POLICY_NAMES = ("wait-all", "single", "staircase", "staircase-standard", "staircase-prefix-cache",
                     "staircase-session", "staircase-deadline", "staircase-smooth", "staircase-straggler",
                     "staircase-load")
ADAPTIVE_NAMES = ("staircase-smooth", "staircase-straggler", "staircase-load", "staircase-ttft")  # staircase.adaptive, prefix-cache layout


def make_policies(
    names: Sequence[str],
    *,
    redundancies: Sequence[int] = (2,),
    proposer_schedule: ChunkSchedule | Sequence[int] | str = PAPER_PROPOSER_SCHEDULE,
    aggregator_schedule: ChunkSchedule | Sequence[int] | str = PAPER_AGGREGATOR_SCHEDULE,
    scope: str = "first",
    max_wait_s: float = 0.5,
    ttft_target_s: float = 1.0,
) -> list[Policy]:
    """Policies from names (CLI vocabulary). ``staircase`` means both per-call layouts
    (standard, prefix-cache; ``staircase-session`` is named on its own: it needs engines
    that keep a session open); each staircase name expands over ``redundancies`` (names
    end in ``-r<r>``)."""
    prop = _as_schedule(proposer_schedule, "proposer_schedule")
    agg = _as_schedule(aggregator_schedule, "aggregator_schedule")
    out: list[Policy] = []
    for raw in names:
        name = raw.strip()
        if name == "wait-all":
            out.append(WaitAllPolicy(agg))
        elif name == "single":
            out.append(SinglePolicy(agg))
        elif name == "staircase" or name in (f"staircase-{layout}" for layout in LAYOUTS):
            layouts = CALL_LAYOUTS if name == "staircase" else (name.removeprefix("staircase-"),)
            for layout in layouts:
                for r in redundancies:
                    out.append(StaircasePolicy(prop, agg, r, scope, layout))
        elif name == "staircase-deadline":
            for r in redundancies:
                out.append(DeadlineStaircasePolicy(max_wait_s, proposer_schedule=prop, aggregator_schedule=agg,
                                                   redundancy=r, scope=scope, layout="prefix-cache",
                                                   name=f"staircase-deadline-r{r}"))
        elif name in ADAPTIVE_NAMES:
            out += _adaptive_policies(name, prop, agg, redundancies, ttft_target_s)
        else:
            raise ConfigError("policy", name, ", ".join(BASE_POLICY_NAMES))
    _check_unique_names(out)
    return out


def _check_unique_names(policies: Sequence[Policy]) -> None:
    seen: set[str] = set()
    for p in policies:
        if p.name in seen:
            raise ConfigError("policy", p.name, "each policy once")
        seen.add(p.name)


from .adaptive import ADAPTIVE_POLICIES  # noqa: E402  (they build on the classes above)


def _adaptive_policies(name: str, prop: ChunkSchedule, agg: ChunkSchedule, redundancies: Sequence[int],
                       ttft_target_s: float) -> list[Policy]:
    cls = next(c for c in ADAPTIVE_POLICIES if c.KIND == name)
    given: dict = {"ttft_target_s": ttft_target_s} if name == "staircase-ttft" else {}
    # a schedule left at the paper's gives the policy its own default (smooth: doubling aggregator steps;
    # ttft: doubling proposer chunks)
    if agg != ChunkSchedule(PAPER_AGGREGATOR_SCHEDULE):
        given["aggregator_schedule"] = agg
    if prop != ChunkSchedule(PAPER_PROPOSER_SCHEDULE):
        given["proposer_schedule"] = prop
    return [cls(redundancy=r, layout="prefix-cache", name=f"{name}-r{r}", **given) for r in redundancies]


POLICY_KINDS: dict[str, type[Policy]] = {c.KIND: c for c in (StaircasePolicy, DeadlineStaircasePolicy, WaitAllPolicy,
                                                             SinglePolicy, *ADAPTIVE_POLICIES)}
_LEGACY_KINDS = {c.__name__: c.KIND for c in POLICY_KINDS.values()}  # what runs before policy configs recorded


def policy_from_dict(raw: dict) -> Policy:
    """A policy from a run's recorded ``policies`` entry (or ``PolicyConfig.to_dict()``)."""
    return PolicyConfig.from_dict(raw).build()
