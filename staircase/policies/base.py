"""The policy protocol: chunk schedules, the views a policy reads, its decisions, its
knobs, and policies as data (``PolicyConfig``).

A policy is the small object the scheduler consults: how a source node's stream is
cut into chunks, how many tokens a consumer's next step generates, and whether a
consumer may start its next step now (``decide``). Baselines are policies too, so
every comparison runs through one code path (the kinds: ``fixed`` and ``adaptive``;
``registry`` names them).

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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Mapping, Protocol, Sequence

from ..errors import ConfigError
from ..spec import Field
from ..topology import Node, Topology

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
        elif isinstance(text, (list, tuple)):
            sizes = tuple(text)
        else:
            raise ConfigError(field, text, "a list of positive token counts, or text like 8,128,256")
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


_SCHEDULE_SCHEMA = {"anyOf": [{"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}},
                              {"type": "string", "pattern": r"^\s*[0-9]*[1-9][0-9]*(\s*[,/]\s*[0-9]*[1-9][0-9]*)*\s*$"}],
                    "description": "chunk sizes in tokens, the last repeating: [8, 128, 256] or \"8,128,256\""}


@dataclass(frozen=True)
class Param:
    """One constructor parameter of the policy kinds, declared once. From it come the
    constructor's check (``check``: the value, or a ``ConfigError`` naming the field, the
    value and what is allowed), the policy config's JSON Schema (``schema``), the knob a
    search varies (``knob``: ``search`` is its range, None when not searched), the
    default and help of the CLI option that sets it.

    ``kind``: a ``staircase.spec.Field`` kind (``int``, ``float`` in [``low``, ``high``],
    ``choice`` among ``choices``), ``count`` (an integer >= 0), ``schedule`` (chunk
    sizes) or ``name`` (a string or None); the first three are checked and described by
    their ``Field``."""

    name: str
    kind: str
    default: object
    low: float | None = None
    high: float | None = None
    search: tuple | None = None
    choices: tuple = ()
    help: str = ""
    open_low: bool = False
    allowed: str = ""

    def field(self) -> Field:
        """The value's ``Field`` (a count is an int >= 0)."""
        count = self.kind == "count"
        return Field(self.name, "int" if count else self.kind, self.default, 0 if count else self.low, self.high,
                     self.choices, self.help, self.open_low,
                     allowed=self.allowed or ("an integer >= 0 and below the number of proposers" if count else ""))

    def check(self, value: object):
        """The value as the policy keeps it (a ``ChunkSchedule`` for a schedule)."""
        if self.kind == "schedule":
            return as_schedule(value, self.name)
        if self.kind == "name":
            return check_name(value, str(self.default))
        return self.field().check(value)

    def schema(self) -> dict:
        """What the policy config's JSON Schema says of this parameter."""
        if self.kind == "schedule":
            return _SCHEDULE_SCHEMA
        if self.kind == "name":
            return {"type": ["string", "null"]}
        return self.field().schema()

    def knob(self) -> "Knob | None":
        """The search's knob of this parameter (None: a search leaves it as it is)."""
        if self.search is None:
            return None
        if self.kind == "choice":
            return Knob(self.name, "choice", choices=self.choices)
        return Knob(self.name, "int" if self.kind == "count" else self.kind, *self.search)


def params_of(spec: Sequence[Param]) -> tuple[str, ...]:
    """A kind's ``PARAMS`` from its ``SPEC``."""
    return tuple(p.name for p in spec)


def knobs_of(spec: Sequence[Param]) -> tuple["Knob", ...]:
    """A kind's ``KNOBS`` from its ``SPEC``: the parameters with a search range."""
    return tuple(k for k in (p.knob() for p in spec) if k is not None)


@dataclass(frozen=True)
class PolicyConfig:
    """A policy as data: its registry ``kind`` and constructor parameters (JSON values,
    lists as tuples). Frozen and hashable, so a search can store, hash and rebuild a
    candidate; ``build()`` makes the policy, ``Policy.config()`` gives it back. Made by
    ``Policy.config()``, or from a kind name or a dict by ``staircase.policies.registry``
    (``config_of``, ``config_from_dict``)."""

    kind: str
    params: tuple[tuple[str, object], ...]
    policy_class: type["Policy"] = field(compare=False, repr=False)

    @classmethod
    def of_class(cls, policy_class: type["Policy"], **params) -> "PolicyConfig":
        """The config of ``policy_class`` with ``params`` (each one of its ``PARAMS``)."""
        kind = policy_class.KIND
        unknown = sorted(set(params) - set(policy_class.PARAMS))
        if unknown:
            raise ConfigError(f"policy.{unknown[0]}", params[unknown[0]],
                              f"parameters of {kind}: {', '.join(policy_class.PARAMS)}")
        frozen = {k: tuple(v.sizes) if isinstance(v, ChunkSchedule) else tuple(v) if isinstance(v, (list, tuple)) else v
                  for k, v in params.items()}
        return cls(kind, tuple(sorted(frozen.items())), policy_class)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params}}

    def key(self) -> str:
        """A stable hash of the config (the same on every machine and run)."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def build(self) -> "Policy":
        return self.policy_class(**{k: list(v) if isinstance(v, tuple) else v for k, v in self.params})


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

    def ends_on_stop(self, node: Node, step: int) -> bool:
        """Whether the model's end of answer (EOS) in ``node``'s step ``step`` ends its
        answer (yes, but for a lead-in: it is only the answer's opening)."""
        return True

    @abstractmethod
    def decide(self, view: ConsumerView) -> Decision:
        """May this consumer start step ``view.step`` now (``STEP``, of ``tokens``), or
        generate the rest (``FINAL``), wait, or fail?"""

    KIND: str = ""
    SPEC: tuple[Param, ...] = ()  # constructor parameters, declared once (PARAMS and KNOBS come from it)
    PARAMS: tuple[str, ...] = ()  # constructor parameters, as attributes of the same names
    KNOBS: tuple[Knob, ...] = ()  # the parameters a search may vary, with their ranges

    def config(self) -> PolicyConfig:
        """This policy as data (``PolicyConfig.build()`` makes an equal one)."""
        return PolicyConfig.of_class(type(self), **{k: getattr(self, k) for k in self.PARAMS})

    def describe(self) -> dict:
        """What runs record: the config (``PolicyConfig.from_dict`` reads it back) plus
        the derived ``layout`` and ``tolerance``."""
        return self.config().to_dict() | {"name": self.name, "layout": self.layout, "tolerance": self.tolerance}


def check_name(value: object, default: str) -> str:
    """A policy's name: a string (empty or None: ``default``)."""
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ConfigError("name", value, "a string (the policy's name in tables and traces)")
    return value


SCHEDULE_TOKENS = (1, 4096)  # a chunk size a search may try, in tokens


def as_schedule(value: ChunkSchedule | Sequence[int] | str, field: str) -> ChunkSchedule:
    return value if isinstance(value, ChunkSchedule) else ChunkSchedule.parse(value, field)


# The parameters the staircase kinds share (``fixed`` and ``adaptive`` add their own).
PROPOSER_SCHEDULE = Param("proposer_schedule", "schedule", PAPER_PROPOSER_SCHEDULE, search=SCHEDULE_TOKENS,
                          help="proposer chunk sizes in tokens; the last repeats")
AGGREGATOR_SCHEDULE = Param("aggregator_schedule", "schedule", PAPER_AGGREGATOR_SCHEDULE, search=SCHEDULE_TOKENS,
                            help="aggregator (final node) chunk sizes in tokens; the last repeats")
REDUNDANCY = Param("redundancy", "count", 2, search=(0, 8), help="inputs a step may leave behind; below the proposers")
SCOPE = Param("scope", "choice", "first", search=(), choices=SCOPES,
              help="apply r to the first step only, or every step")
LAYOUT = Param("layout", "choice", "prefix-cache", search=(), choices=LAYOUTS)
NAME = Param("name", "name", None)
