"""A run's topology and policies from the shared options as plain values.

``staircase sim`` and ``staircase live`` parse these options (``staircase.cli``
adds them to a parser); runs recorded before topology and policy configs were written
keep them as ``cli_args`` in ``config.json``, and ``staircase validate`` rebuilds
those runs from that mapping with the same function.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from .errors import ConfigError
from .jsonio import parse_json, read_json
from .policies import ChunkSchedule, Policy, make_policies, param, policy_from_dict
from .topology import Topology, build

TOPOLOGY_POLICY_KEYS = ("topology", "proposers", "layers", "agents", "rounds", "policies", "redundancy", "scope",
                        "proposer_schedule", "aggregator_schedule", "max_wait_s", "ttft_target_s", "lead_in_s",
                        "policy_config")


def parse_int_list(text: str, field: str, minimum: int = 0) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a ConfigError naming ``field`` otherwise."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(field, text, f"comma-separated integers >= {minimum}") from None
    if not values or any(v < minimum for v in values):
        raise ConfigError(field, text, f"comma-separated integers >= {minimum}")
    return values


def parse_float_list(text: str, field: str) -> list[float]:
    """``"0.3,0.7"`` -> [0.3, 0.7]: finite numbers; a ConfigError naming ``field`` otherwise."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(field, text, "comma-separated numbers, e.g. 0.3,0.7")
    return values


def topology_from_values(values: Mapping) -> Topology:
    """The topology of the options ``topology``, ``proposers``, ``layers``, ``agents``, ``rounds``."""
    return build(values["topology"], proposers=values["proposers"], layers=values["layers"],
                 agents=values["agents"], rounds=values["rounds"])


def policy_from_json(text: str) -> Policy:
    return policy_from_dict(parse_json(text, "policy-config"))


def policies_from_option(text: str) -> list[Policy]:
    """One ``--policy-config`` value: a policy as a JSON object, or the path of a
    ``best.json`` (``staircase search``: its best policy) or a ``plan.json``
    (``staircase plan``: every policy that met the SLOs, cheapest first)."""
    if text.lstrip().startswith("{"):
        return [policy_from_json(text)]
    path = Path(text)
    if not path.is_file():
        raise ConfigError("policy-config", text, "a JSON object, or the path of a best.json or plan.json")
    raw = read_json(path, "policy-config")
    if isinstance(raw, dict) and isinstance(raw.get("best"), dict):
        return [policy_from_dict(raw["best"])]
    if isinstance(raw, dict) and isinstance(raw.get("policies"), dict):
        cost = lambda p: p["cost_per_hour"] if isinstance(p.get("cost_per_hour"), (int, float)) else float("inf")  # noqa: E731
        met = sorted((p for p in raw["policies"].values() if isinstance(p, dict) and p.get("met") is True), key=cost)
        if not met:
            raise ConfigError("policy-config", text, "a plan.json in which some policy met the SLOs")
        return [policy_from_dict(p.get("config")) for p in met]
    if isinstance(raw, dict) and "kind" in raw:
        return [policy_from_dict(raw)]
    raise ConfigError("policy-config", text, "a best.json (key best), a plan.json (key policies) or a policy config")


def topology_and_policies_from_values(values: Mapping) -> tuple[Topology, list[Policy]]:
    """Build and check the topology and policies of ``TOPOLOGY_POLICY_KEYS``' values."""
    topology = topology_from_values(values)
    names = [n for n in values["policies"].split(",") if n.strip()]
    policies = make_policies(
        names,
        redundancies=parse_int_list(values["redundancy"], "redundancy"),
        proposer_schedule=ChunkSchedule.parse(values["proposer_schedule"], "proposer_schedule"),
        aggregator_schedule=ChunkSchedule.parse(values["aggregator_schedule"], "aggregator_schedule"),
        scope=values["scope"], max_wait_s=values["max_wait_s"],
        ttft_target_s=values.get("ttft_target_s", param("ttft_target_s").default),  # (older runs lack these two)
        lead_in_s=values.get("lead_in_s", param("lead_in_s").default)) if names else []
    policies += [p for text in values.get("policy_config") or [] for p in policies_from_option(text)]
    if not policies:
        raise ConfigError("policies", values["policies"], "at least one policy (names, or --policy-config)")
    if len({p.name for p in policies}) != len(policies):
        raise ConfigError("policies", [p.name for p in policies], "each policy name once (give a config its own name)")
    for policy in policies:
        policy.validate_for(topology)
    return topology, policies
