"""Faults at random: a failure rate per call, by slot group, slot or pool.

``--faults 'proposers=0.05'`` makes every proposer call fail with probability 0.05, at a
token drawn uniformly from its answer (the chunks that ended before it are delivered,
the rest is lost, as a live stream that breaks); ``aggregator=0.01`` does the same to the
final node's calls; a slot (``proposer-2``) or a deployment's pool name (``small``) sets
its own rate, the most specific key winning (pool, then slot, then group).

Draws are a pure function of (seed, request, node, call): every policy of a run, and
every deployment of a plan or search, meets the same faults on the same calls (common
random numbers), whatever order the simulator reaches them in.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping

from staircase.errors import ConfigError

GROUPS = ("proposers", "aggregator")
_MASK = (1 << 64) - 1


def parse_fault_rates(text: str | Mapping | None) -> dict[str, float]:
    """``"proposers=0.05,aggregator=0.01"`` (or a mapping) -> {key: rate}; rates in [0, 1]."""
    if text is None or text == "":
        return {}
    items = text.items() if isinstance(text, Mapping) else [p.partition("=")[::2] for p in str(text).split(",")]
    rates = {}
    for key, value in items:
        key = str(key).strip()
        try:
            rate = float(value)
        except (TypeError, ValueError):
            raise ConfigError("faults", f"{key}={value}", "KEY=RATE pairs, e.g. proposers=0.05 (a rate per call "
                              "in [0, 1])") from None
        if not key or not (math.isfinite(rate) and 0 <= rate <= 1):
            raise ConfigError(f"faults.{key or '?'}", value, "a failure rate per call in [0, 1]")
        rates[key] = rate
    return rates


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value from any 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@dataclass(frozen=True)
class RandomFaults:
    rates: Mapping[str, float]
    seed: int = 0

    def check(self, slots: Iterable[str], pools: Iterable[str] = ()) -> "RandomFaults":
        """Every key names a group, a slot of the topology, or a pool of the deployment."""
        known = [*GROUPS, *sorted(set(slots)), *sorted(set(pools))]
        for key in self.rates:
            if key not in known:
                raise ConfigError("faults", key, ", ".join(known))
        return self

    def rate(self, slot: str, engine: str) -> float:
        """The failure rate of a call on ``slot`` placed on ``engine`` (``<pool>/<i>``)."""
        pool = engine.rsplit("/", 1)[0] if "/" in engine else None
        for key in (pool, slot, "aggregator" if slot == "aggregator" else "proposers"):
            if key is not None and key in self.rates:
                return self.rates[key]
        return 0.0

    def fail_token(self, request_id: int, node_id: str, call: int, rate: float, length: int) -> int | None:
        """The token of this call's answer (of ``length``) at which it breaks, or None."""
        if rate <= 0:
            return None
        key = _mix(self.seed & _MASK) ^ _mix(request_id) ^ _mix(zlib.crc32(node_id.encode()) << 20 | call)
        first = _mix(key)
        if first / 2.0 ** 64 >= rate:
            return None
        return int(_mix(first) / 2.0 ** 64 * max(1, length))
