"""Topologies: which nodes run in which stage and whose output each node reads.

MoA: ``layers`` stages of ``proposers`` nodes, then one aggregator that streams to the
user; every node of a layer reads every node of the previous layer. MAD: ``agents``
nodes over ``rounds`` stages (round 0 answers alone, round r reads every agent of
round r-1), then a judge that streams to the user. Staircase streaming applies
between every pair of consecutive stages; the scheduler does not care which kind
it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

from .errors import ConfigError

TOPOLOGY_KINDS = ("moa", "mad")


@dataclass(frozen=True)
class Node:
    """One LLM call site of a request. ``slot`` names the engine role it runs on
    (``proposer-<i>`` or ``aggregator``): a profile or live config maps slots to engines."""

    id: str
    role: str  # "proposer", "aggregator", "agent", "judge"
    stage: int
    index: int
    slot: str
    upstream: tuple[str, ...] = ()
    is_final: bool = False

    @property
    def is_source(self) -> bool:
        return not self.upstream


@dataclass(frozen=True)
class Topology:
    kind: str  # "moa", "mad", or "single" (a plan that keeps only the final node)
    nodes: tuple[Node, ...]
    params: dict = field(default_factory=dict, compare=False)

    @cached_property
    def by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @cached_property
    def final(self) -> Node:
        return next(n for n in self.nodes if n.is_final)

    @cached_property
    def downstream(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for u in n.upstream:
                out[u].append(n.id)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def min_fan_in(self) -> int:
        """Smallest number of upstream nodes any consumer reads (bounds the redundancy)."""
        fan = [len(n.upstream) for n in self.nodes if n.upstream]
        return min(fan) if fan else 0

    def only_final(self) -> "Topology":
        """The plan of the ``single`` baseline: the final node answers the query alone."""
        f = self.final
        return Topology("single", (Node(f.id, f.role, 0, 0, f.slot, (), True),), dict(self.params))

    def config(self) -> dict:
        """This topology as data: ``topology_from_config`` rebuilds it."""
        return {"kind": self.kind, **self.params}

    def describe(self) -> str:
        if self.kind == "moa":
            return f"MoA, {self.params['layers']} layer(s) x {self.params['proposers']} proposers -> aggregator"
        if self.kind == "mad":
            return f"MAD, {self.params['agents']} agents x {self.params['rounds']} rounds -> judge"
        return "single model"


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")
    return value


def _staged(stages: int, width: int, id_format: str, role: str, final: tuple[str, str]) -> tuple[Node, ...]:
    """``stages`` stages of ``width`` nodes, each reading every node of the stage before,
    then one final node reading the last stage. Node i of every stage runs on slot proposer-i."""
    nodes: list[Node] = []
    previous: tuple[str, ...] = ()
    for stage in range(stages):
        ids = tuple(id_format.format(stage=stage, i=i) for i in range(width))
        nodes += [Node(node_id, role, stage, i, f"proposer-{i}", previous) for i, node_id in enumerate(ids)]
        previous = ids
    final_id, final_role = final
    nodes.append(Node(final_id, final_role, stages, 0, "aggregator", previous, True))
    return tuple(nodes)


def moa(proposers: int = 3, layers: int = 1) -> Topology:
    """Mixture-of-Agents: ``layers`` layers of ``proposers`` nodes, then an aggregator."""
    _positive("proposers", proposers)
    _positive("layers", layers)
    nodes = _staged(layers, proposers, "L{stage}.p{i}", "proposer", ("agg", "aggregator"))
    return Topology("moa", nodes, {"proposers": proposers, "layers": layers})


def mad(agents: int = 3, rounds: int = 2) -> Topology:
    """Multi-Agent Debate: ``agents`` over ``rounds`` rounds, then a judge streams to the user."""
    _positive("agents", agents, 2)
    _positive("rounds", rounds)
    nodes = _staged(rounds, agents, "R{stage}.a{i}", "agent", ("judge", "judge"))
    return Topology("mad", nodes, {"agents": agents, "rounds": rounds})


def build(kind: str, *, proposers: int = 3, layers: int = 1, agents: int = 3, rounds: int = 2) -> Topology:
    if kind == "moa":
        return moa(proposers, layers)
    if kind == "mad":
        return mad(agents, rounds)
    raise ConfigError("topology", kind, " or ".join(TOPOLOGY_KINDS))


def topology_from_config(raw: dict) -> Topology:
    """A topology from ``Topology.config()`` (what runs record as ``topology_config``)."""
    if not isinstance(raw, dict) or raw.get("kind") not in TOPOLOGY_KINDS:
        raise ConfigError("topology_config.kind", raw.get("kind") if isinstance(raw, dict) else raw,
                          " or ".join(TOPOLOGY_KINDS))
    names = {"moa": ("proposers", "layers"), "mad": ("agents", "rounds")}[raw["kind"]]
    return build(raw["kind"], **{k: raw[k] for k in names if k in raw})


def proposer_slot_index(slot: str) -> int | None:
    """``i`` of ``proposer-<i>``; None for ``aggregator``. Other names are an error."""
    if slot == "aggregator":
        return None
    if slot.startswith("proposer-") and slot[9:].isdigit():
        return int(slot[9:])
    raise ConfigError("slot", slot, "aggregator or proposer-<i>")


def slot_target(slot: str, proposers: Sequence, aggregator):
    """The slot rule, the one place it lives: ``proposer-i`` runs on
    ``proposers[i % len(proposers)]``, ``aggregator`` on ``aggregator`` (engines in a
    live config, engine models in a profile)."""
    i = proposer_slot_index(slot)
    return aggregator if i is None else proposers[i % len(proposers)]
