"""Deployments as data: pools of engine replicas, the topology's slots mapped to pools,
and a router per pool that picks the replica each call runs on.

A deployment file (JSON, or YAML where PyYAML is installed)::

    {"pools": {"small": {"model": "proposer-8b", "replicas": 4, "router": "least-loaded"},
               "big":   {"model": "aggregator-70b", "replicas": 2, "router": "affinity"}},
     "slots": {"proposers": ["small"], "aggregator": "big"}}

``model`` names an engine model of the profile (the simulator) or an engine config
(live). ``proposer-i`` runs on ``proposers[i % n]``, the final node on ``aggregator``
(``staircase.topology.slot_target``). Today's two ``engine_sharing`` modes are
``Deployment.per_slot`` and ``Deployment.one``.

Routers are core objects, so the simulator and the live runner route alike. Each sees
the pool's replicas through ``ReplicaView`` (calls in flight, KV tokens held) and picks
one per call:

- ``round-robin``: the next replica in turn;
- ``least-loaded``: the fewest calls in flight (ties: the lowest index);
- ``least-kv``: the fewest KV tokens held (ties: fewer calls, then the lowest index);
- ``power-of-two``: two replicas drawn at random (seeded), the less loaded of them;
- ``affinity``: every call of one node of one request on one replica (the aggregator's
  steps hit its prefix cache, a session stays on its engine); a node's first call goes
  to the least-loaded replica.

``Placement`` binds a deployment to a run's replicas (simulated engines, or the live
runner's views of real ones): the simulator (``staircase sim --deployment FILE``) and
the live runner (``staircase live --deployment FILE``) place every call through it.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Iterable, Mapping, Protocol, Sequence, TypeVar

from .errors import ConfigError
from .jsonio import parse_json
from .spec import Field, ObjectSpec
from .topology import slot_target

SCHEMA_ID = "staircase-deployment/1"


class ReplicaView(Protocol):
    """What a router reads of a replica."""

    @property
    def in_flight(self) -> int: ...

    @property
    def kv_tokens(self) -> int: ...


class Router(ABC):
    """Picks the replica of a pool that serves a call. One router per pool and run."""

    NAME = ""

    def __init__(self, seed: int = 0):
        """``seed``: for routers that draw (power of two); the others keep none."""

    @abstractmethod
    def pick(self, replicas: Sequence[ReplicaView], request_id: int, node_id: str) -> int:
        """The index of the replica for this call of ``node_id`` in ``request_id``."""

    def release(self, request_id: int) -> None:
        """A request ended: forget what the router kept of it (affinity)."""


def _least(replicas: Sequence[ReplicaView], key) -> int:
    return min(range(len(replicas)), key=lambda i: (key(replicas[i]), i))


class RoundRobin(Router):
    NAME = "round-robin"

    def __init__(self, seed: int = 0):
        self.next = 0

    def pick(self, replicas, request_id, node_id):
        i = self.next % len(replicas)
        self.next = i + 1
        return i


class LeastLoaded(Router):
    NAME = "least-loaded"

    def pick(self, replicas, request_id, node_id):
        return _least(replicas, lambda r: r.in_flight)


class LeastKV(Router):
    NAME = "least-kv"

    def pick(self, replicas, request_id, node_id):
        return _least(replicas, lambda r: (r.kv_tokens, r.in_flight))


class PowerOfTwo(Router):
    NAME = "power-of-two"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def pick(self, replicas, request_id, node_id):
        if len(replicas) == 1:
            return 0
        a, b = self.rng.sample(range(len(replicas)), 2)
        return min((a, b), key=lambda i: (replicas[i].in_flight, i))


class Affinity(Router):
    NAME = "affinity"

    def __init__(self, seed: int = 0):
        self.placed: dict[tuple[int, str], int] = {}

    def pick(self, replicas, request_id, node_id):
        key = (request_id, node_id)
        if key not in self.placed:
            self.placed[key] = _least(replicas, lambda r: r.in_flight)
        return self.placed[key]

    def release(self, request_id: int) -> None:
        for key in [k for k in self.placed if k[0] == request_id]:
            del self.placed[key]


ROUTERS: dict[str, type[Router]] = {r.NAME: r for r in (RoundRobin, LeastLoaded, LeastKV, PowerOfTwo, Affinity)}


@dataclass(frozen=True)
class Pool:
    """``replicas`` engines of one ``model`` behind one ``router``."""

    name: str
    model: str
    replicas: int = 1
    router: str = "least-loaded"

    def make_router(self, seed: int = 0) -> Router:
        return ROUTERS[self.router](seed)


@dataclass(frozen=True)
class Deployment:
    pools: Mapping[str, Pool]
    proposers: tuple[str, ...]  # pool names, ``proposer-i`` -> ``proposers[i % n]``
    aggregator: str
    raw: dict = field(default_factory=dict, compare=False)

    def pool_for_slot(self, slot: str) -> Pool:
        return self.pools[slot_target(slot, self.proposers, self.aggregator)]

    @property
    def engines(self) -> int:
        return sum(p.replicas for p in self.pools.values())

    def engine_pools(self) -> dict[str, str]:
        """Replica name (``<pool>/<i>``) -> its pool, for every pool."""
        return {name: p.name for p in self.pools.values() for name in replica_names(p)}

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_ID,
                "pools": {p.name: {"model": p.model, "replicas": p.replicas, "router": p.router}
                          for p in self.pools.values()},
                "slots": {"proposers": list(self.proposers), "aggregator": self.aggregator}}

    @classmethod
    def of_slots(cls, proposers: Sequence[str], aggregator: str) -> "Deployment":
        """One replica per named engine, slots as named (an engines config's ``slots``):
        a pool per engine, each its own model."""
        names = list(dict.fromkeys([*proposers, aggregator]))
        return deployment_from_dict({"pools": {n: {"model": n} for n in names},
                                     "slots": {"proposers": list(proposers), "aggregator": aggregator}})

    @classmethod
    def one(cls, model: str) -> "Deployment":
        """Every slot on one engine (``engine_sharing: "one"``)."""
        return deployment_from_dict({"pools": {"shared": {"model": model}},
                                     "slots": {"proposers": ["shared"], "aggregator": "shared"}})

    @classmethod
    def per_slot(cls, proposer_models: Sequence[str], aggregator_model: str, proposers: int) -> "Deployment":
        """An engine of its own per slot (``engine_sharing: "per-slot"``): ``proposer-i``
        on ``proposer_models[i % n]``."""
        pools = {f"proposer-{i}": {"model": proposer_models[i % len(proposer_models)]} for i in range(proposers)}
        pools["aggregator"] = {"model": aggregator_model}
        return deployment_from_dict({"pools": pools, "slots": {"proposers": [f"proposer-{i}" for i in range(proposers)],
                                                              "aggregator": "aggregator"}})


R = TypeVar("R", bound=ReplicaView)


class Placement(Generic[R]):
    """A deployment bound to one run's replicas: each slot's pool (its replicas, in
    order) and the pool's router (one per pool, seeded). ``pick`` places a call."""

    def __init__(self, deployment: Deployment, slots: Iterable[str], replicas: Mapping[str, Sequence[R]],
                 seed: int = 0, eject_after: int = 3, cooldown_s: float = 30.0):
        """``replicas``: pool name -> its ``replicas`` replicas (``<pool>/<i>`` in order);
        ``eject_after`` failed calls in a row eject a replica for ``cooldown_s`` (0: never)."""
        self.eject_after, self.cooldown_s = eject_after, cooldown_s
        self.failures: dict[int, int] = {}  # id(replica) -> failed calls in a row
        self.ejected_until: dict[int, float] = {}  # id(replica) -> when it is tried again
        self.ejections: list[tuple[float, str]] = []  # (when, replica) of every ejection
        used = {slot: deployment.pool_for_slot(slot) for slot in slots}
        for pool in {p.name: p for p in used.values()}.values():
            got = len(replicas.get(pool.name, ()))
            if got != pool.replicas:
                raise ConfigError(f"deployment.pools.{pool.name}.replicas", pool.replicas,
                                  f"the number of replicas the run built ({got})")
        routers = {name: deployment.pools[name].make_router(seed) for name in {p.name for p in used.values()}}
        self.deployment = deployment
        self.pools: dict[str, tuple[R, ...]] = {name: tuple(replicas[name]) for name in routers}  # the used pools
        self.by_slot: dict[str, tuple[Sequence[R], Router]] = {
            slot: (self.pools[p.name], routers[p.name]) for slot, p in used.items()}
        self.routers = list(routers.values())

    def engine_pools(self) -> dict[str, str]:
        """Replica name -> its pool, for the pools some slot uses."""
        return {r.name: pool for pool, reps in self.pools.items() for r in reps}

    def pick(self, slot: str, request_id: int, node_id: str, now: float = 0.0) -> R:
        """The replica for a call at ``now`` (seconds, the caller's clock): the router picks
        among the pool's replicas not ejected (``outcome``); when every replica is
        ejected, among all of them (a pool never routes nowhere)."""
        replicas, router = self.by_slot[slot]
        if self.ejected_until:
            up = [r for r in replicas if self.ejected_until.get(id(r), 0.0) <= now]
            if up and len(up) < len(replicas):
                replicas = up  # (an affinity router's placements made before may now point elsewhere)
        return replicas[router.pick(replicas, request_id, node_id)]

    def outcome(self, replica: R, ok: bool, now: float) -> bool:
        """A call on ``replica`` ended, answered (``ok``) or failed (an engine error, not a
        cancel): after ``eject_after`` failures in a row the replica gets no calls for
        ``cooldown_s`` (outlier ejection), then is tried again. True when this ejected it."""
        key = id(replica)
        if ok:
            self.failures.pop(key, None)
            return False
        self.failures[key] = n = self.failures.get(key, 0) + 1
        if self.eject_after and n >= self.eject_after:
            self.failures[key] = 0
            self.ejected_until[key] = now + self.cooldown_s
            self.ejections.append((now, getattr(replica, "name", str(key))))
            return True
        return False

    def least_in_flight(self, slot: str) -> int:
        """Calls in flight on the slot pool's least busy replica (a policy's load signal)."""
        return min([r.in_flight for r in self.by_slot[slot][0]])

    def release(self, request_id: int) -> None:
        for router in self.routers:
            router.release(request_id)


def replica_names(pool: Pool) -> list[str]:
    """``<pool>/<i>``: the engine names of a pool's replicas, in both runners."""
    return [f"{pool.name}/{i}" for i in range(pool.replicas)]


POOL = ObjectSpec((
    Field("model", "str", required=True, nonempty=True, allowed="a model name",
          help="the engine model its replicas run (a profile's engine, an engine config's entry)"),
    Field("replicas", "int", 1, low=1, help="engines of that model"),
    Field("router", "choice", "least-loaded", choices=ROUTERS, help="how a call picks a replica"),
))


def _pool(name: str, raw: object, models: Sequence[str] | None) -> Pool:
    where = f"deployment.pools.{name}"
    if not name:
        raise ConfigError("deployment.pools", name, "pool names that are not empty")
    pool = POOL.check(raw, where)
    if models is not None and pool["model"] not in models:
        raise ConfigError(f"{where}.model", pool["model"], f"one of {', '.join(models)}")
    return Pool(name, pool["model"], pool["replicas"], pool["router"])


def deployment_from_dict(raw: object, models: Sequence[str] | None = None) -> Deployment:
    """Check a deployment object (every error names its field); ``models``: the model
    names a pool may use (None: any)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("pools"), dict) or not raw["pools"]:
        raise ConfigError("deployment.pools", raw.get("pools") if isinstance(raw, dict) else raw,
                          "an object of named pools")
    unknown = sorted(set(raw) - {"schema", "pools", "slots"})
    if unknown:
        raise ConfigError(f"deployment.{unknown[0]}", raw[unknown[0]], "schema, pools, slots")
    if raw.get("schema", SCHEMA_ID) != SCHEMA_ID:
        raise ConfigError("deployment.schema", raw["schema"], SCHEMA_ID)
    pools = {name: _pool(name, spec, models) for name, spec in raw["pools"].items()}
    proposers, aggregator = parse_slots(raw.get("slots"), list(pools), "deployment", "pool")
    return Deployment(pools, tuple(proposers), aggregator, dict(raw))


def parse_slots(slots: object, names: Sequence[str], where: str, what: str) -> tuple[list[str], str]:
    """``{"proposers": [name, ...], "aggregator": name}``, each one of ``names`` (the
    deployment's pools, a config's engines, a profile's engine models): (proposers,
    aggregator), or a ConfigError naming ``<where>.slots...``."""
    if not isinstance(slots, dict):
        raise ConfigError(f"{where}.slots", slots, f"an object with proposers (a list of {what}s) and aggregator")
    proposers = slots.get("proposers")
    if not isinstance(proposers, list) or not proposers or any(not isinstance(p, str) or p not in names
                                                               for p in proposers):
        raise ConfigError(f"{where}.slots.proposers", proposers, f"a list of {what} names from {', '.join(names)}")
    aggregator = slots.get("aggregator")
    if not isinstance(aggregator, str) or aggregator not in names:
        raise ConfigError(f"{where}.slots.aggregator", aggregator, f"one of the {what}s {', '.join(names)}")
    return proposers, aggregator


def load_deployment(path: str | Path, models: Sequence[str] | None = None) -> Deployment:
    """A deployment file: JSON, or YAML (``.yaml``/``.yml``, with PyYAML installed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("deployment", str(path), "an existing JSON or YAML file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("deployment", str(path), "JSON (PyYAML is not installed for YAML)") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError("deployment", str(path), f"valid YAML ({str(err).splitlines()[0]})") from None
    else:
        raw = parse_json(text, "deployment", str(path))
    return deployment_from_dict(raw, models)


def json_schema() -> dict:
    """The deployment file's JSON Schema (what ``deployment_from_dict`` checks). Beyond
    it: the slots name pools of the file; with an engine config, a pool's ``model``
    names one of its engines."""
    pool = POOL.schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "staircase deployment", "type": "object", "required": ["pools", "slots"],
            "additionalProperties": False,
            "properties": {"schema": {"const": SCHEMA_ID},
                           "pools": {"type": "object", "minProperties": 1, "propertyNames": {"minLength": 1},
                                     "additionalProperties": pool},
                           "slots": slots_schema()}}


def slots_schema() -> dict:
    """The JSON Schema of the slots ``parse_slots`` reads (deployment, engine config, profile)."""
    return {"type": "object", "required": ["proposers", "aggregator"],
            "properties": {"proposers": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                           "aggregator": {"type": "string"}}}
