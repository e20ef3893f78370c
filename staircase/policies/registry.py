"""Every policy kind and every policy name, in one place.

The only module that imports every kind (``fixed`` and ``adaptive``). Two tables:

- ``POLICY_KINDS``: kind -> class, what ``PolicyConfig`` data is built from
  (``config_of``, ``config_from_dict``, ``policy_from_dict``) and what a search varies.
- ``POLICY_NAMES``: the CLI's vocabulary (``--policies wait-all,staircase``): each name
  with its help line and how it expands over the shared options (redundancies,
  schedules); ``make_policies`` reads it, and the CLI's choices and help come from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import ConfigError
from .adaptive import (ADAPTIVE_POLICIES, LEAD_IN_S, TTFT_TARGET, LeadInStaircasePolicy, LoadAwareStaircasePolicy,
                       SmoothStaircasePolicy, StragglerStaircasePolicy, TTFTTargetStaircasePolicy)
from .base import (AGGREGATOR_SCHEDULE, CALL_LAYOUTS, LAYOUTS, PAPER_AGGREGATOR_SCHEDULE, PAPER_PROPOSER_SCHEDULE,
                   PROPOSER_SCHEDULE, REDUNDANCY, SCOPE, SCOPES, ChunkSchedule, ConsumerView, Decision, DecisionKind,
                   Knob, Param, Policy, PolicyConfig, StreamView, UpstreamView, as_schedule)
from .fixed import MAX_WAIT, DeadlineStaircasePolicy, SinglePolicy, StaircasePolicy, WaitAllPolicy

POLICY_KINDS: dict[str, type[Policy]] = {c.KIND: c for c in (StaircasePolicy, DeadlineStaircasePolicy, WaitAllPolicy,
                                                             SinglePolicy, *ADAPTIVE_POLICIES)}
_LEGACY_KINDS = {c.__name__: c.KIND for c in POLICY_KINDS.values()}  # what runs before policy configs recorded

__all__ = ["ADAPTIVE_POLICIES", "CALL_LAYOUTS", "LAYOUTS", "PAPER_AGGREGATOR_SCHEDULE", "PAPER_PROPOSER_SCHEDULE",
           "POLICY_KINDS", "POLICY_NAMES", "SCOPES", "Param", "param", "ChunkSchedule", "ConsumerView", "Decision", "DecisionKind",
           "DeadlineStaircasePolicy", "Knob", "LeadInStaircasePolicy", "LoadAwareStaircasePolicy", "Policy",
           "PolicyConfig", "PolicyName",
           "SinglePolicy", "SmoothStaircasePolicy", "StaircasePolicy", "StragglerStaircasePolicy", "StreamView",
           "TTFTTargetStaircasePolicy", "UpstreamView", "WaitAllPolicy", "config_from_dict", "config_of",
           "json_schema", "make_policies", "policy_from_dict", "policy_names_help"]


PARAMS: dict[str, Param] = {p.name: p for cls in POLICY_KINDS.values() for p in cls.SPEC}


def param(name: str) -> Param:
    """A policy parameter's one declaration (its default, ranges, help), by name."""
    if name not in PARAMS:
        raise ConfigError("policy parameter", name, ", ".join(PARAMS))
    return PARAMS[name]


def config_of(kind: str, **params) -> PolicyConfig:
    """The config of a registered ``kind`` with ``params`` (each one of its ``PARAMS``)."""
    if kind not in POLICY_KINDS:
        raise ConfigError("policy.kind", kind, ", ".join(POLICY_KINDS))
    return PolicyConfig.of_class(POLICY_KINDS[kind], **params)


def config_from_dict(raw: dict) -> PolicyConfig:
    """From ``PolicyConfig.to_dict()`` or a run's recorded ``policies`` entry (also the
    class-name kinds older runs recorded); keys that are not parameters are ignored."""
    if not isinstance(raw, dict):
        raise ConfigError("policy", raw, "an object with a kind and its parameters")
    kind = raw.get("kind")
    kind = _LEGACY_KINDS.get(kind, kind) if isinstance(kind, str) else None
    if kind not in POLICY_KINDS:
        raise ConfigError("policy.kind", raw.get("kind"), ", ".join(POLICY_KINDS))
    return config_of(kind, **{k: raw[k] for k in POLICY_KINDS[kind].PARAMS if k in raw})


def policy_from_dict(raw: dict) -> Policy:
    """A policy from a run's recorded ``policies`` entry (or ``PolicyConfig.to_dict()``)."""
    return config_from_dict(raw).build()


@dataclass(frozen=True)
class NameOptions:
    """The CLI's shared policy options a name expands over."""

    redundancies: Sequence[int]
    proposer_schedule: ChunkSchedule
    aggregator_schedule: ChunkSchedule
    scope: str
    max_wait_s: float
    ttft_target_s: float
    lead_in_s: float = 0.0


@dataclass(frozen=True)
class PolicyName:
    """A name of the CLI's vocabulary: its help line and the policies it stands for."""

    name: str
    help: str
    make: Callable[[NameOptions], list[Policy]]


def _staircases(layouts: Sequence[str]) -> Callable[[NameOptions], list[Policy]]:
    return lambda o: [StaircasePolicy(o.proposer_schedule, o.aggregator_schedule, r, o.scope, layout)
                      for layout in layouts for r in o.redundancies]


def _deadline(o: NameOptions) -> list[Policy]:
    return [DeadlineStaircasePolicy(o.max_wait_s, proposer_schedule=o.proposer_schedule,
                                    aggregator_schedule=o.aggregator_schedule, redundancy=r, scope=o.scope,
                                    layout="prefix-cache", name=f"staircase-deadline-r{r}") for r in o.redundancies]


def _adaptive(cls: type[StaircasePolicy]) -> Callable[[NameOptions], list[Policy]]:
    """Prefix-cache layout; a schedule left at the paper's gives the policy its own
    default (smooth: doubling aggregator steps; ttft: doubling proposer chunks)."""

    def make(o: NameOptions) -> list[Policy]:
        given: dict = {k: getattr(o, k) for k in ("ttft_target_s", "lead_in_s") if k in cls.PARAMS}
        if o.aggregator_schedule != ChunkSchedule(PAPER_AGGREGATOR_SCHEDULE):
            given["aggregator_schedule"] = o.aggregator_schedule
        if o.proposer_schedule != ChunkSchedule(PAPER_PROPOSER_SCHEDULE):
            given["proposer_schedule"] = o.proposer_schedule
        return [cls(redundancy=r, layout="prefix-cache", name=f"{cls.KIND}-r{r}", **given) for r in o.redundancies]

    return make


POLICY_NAMES: dict[str, PolicyName] = {n.name: n for n in (
    PolicyName("wait-all", "standard MoA: each consumer starts once all its inputs finished",
               lambda o: [WaitAllPolicy(o.aggregator_schedule)]),
    PolicyName("single", "the final node's model answers the query alone", lambda o: [SinglePolicy(o.aggregator_schedule)]),
    PolicyName("staircase", "the paper's staircase in both per-call layouts (standard, prefix-cache)",
               _staircases(CALL_LAYOUTS)),
    PolicyName("staircase-standard", "the staircase, MoA prompts rebuilt each step", _staircases(("standard",))),
    PolicyName("staircase-prefix-cache", "the staircase, append-only prompts (prefix-cache hits)",
               _staircases(("prefix-cache",))),
    PolicyName("staircase-session", "prefix-cache prompts as one engine session per aggregator (in-process vLLM)",
               _staircases(("session",))),
    PolicyName("staircase-deadline", "the first step also starts after --max-wait-s", _deadline),
    PolicyName("staircase-smooth", "proposer chunks sized from observed rates (no long stall)",
               _adaptive(SmoothStaircasePolicy)),
    PolicyName("staircase-straggler", "waits for late inputs up to their spread", _adaptive(StragglerStaircasePolicy)),
    PolicyName("staircase-load", "wait-all when the aggregator's engine is busy", _adaptive(LoadAwareStaircasePolicy)),
    PolicyName("staircase-ttft", "the first step reads all it can within --ttft-target-s",
               _adaptive(TTFTTargetStaircasePolicy)),
    PolicyName("staircase-lead-in", "the answer starts from the query alone (or at --lead-in-s) and reads the "
               "proposals as they stream", _adaptive(LeadInStaircasePolicy)),
)}


def policy_names_help() -> str:
    """The ``--policies`` help: every name with its line."""
    return "comma list of: " + "; ".join(f"{n.name} ({n.help})" for n in POLICY_NAMES.values())


def make_policies(
    names: Sequence[str],
    *,
    redundancies: Sequence[int] = (REDUNDANCY.default,),
    proposer_schedule: ChunkSchedule | Sequence[int] | str = PROPOSER_SCHEDULE.default,
    aggregator_schedule: ChunkSchedule | Sequence[int] | str = AGGREGATOR_SCHEDULE.default,
    scope: str = SCOPE.default,
    max_wait_s: float = MAX_WAIT.default,
    ttft_target_s: float = TTFT_TARGET.default,
    lead_in_s: float = LEAD_IN_S.default,
) -> list[Policy]:
    """Policies from names (``POLICY_NAMES``). ``staircase`` means both per-call layouts
    (``staircase-session`` is named on its own: it needs engines that keep a session
    open); each staircase name expands over ``redundancies`` (names end in ``-r<r>``)."""
    options = NameOptions(redundancies, as_schedule(proposer_schedule, "proposer_schedule"),
                          as_schedule(aggregator_schedule, "aggregator_schedule"), scope, max_wait_s, ttft_target_s,
                          lead_in_s)
    out: list[Policy] = []
    for raw in names:
        entry = POLICY_NAMES.get(raw.strip())
        if entry is None:
            raise ConfigError("policy", raw.strip(), ", ".join(POLICY_NAMES))
        out += entry.make(options)
    seen: set[str] = set()
    for p in out:
        if p.name in seen:
            raise ConfigError("policy", p.name, "each policy once")
        seen.add(p.name)
    return out


SCHEMA_ID = "https://staircase.dev/schemas/policy.json"
def json_schema() -> dict:
    """The JSON Schema of a policy config (``--policy-config``, a search's ``best``, a
    plan's ``config``): one of the kinds with its parameters; other keys are ignored (a
    run's recorded entries carry more). ``min_chunk`` <= ``max_chunk`` and a redundancy
    below the number of proposers are checked beyond the schema."""
    kinds = [{"title": kind, "type": "object", "required": ["kind"],
              "properties": {"kind": {"const": kind}, **{p.name: p.schema() for p in cls.SPEC}}}
             for kind, cls in POLICY_KINDS.items()]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "staircase policy config", "oneOf": kinds}
