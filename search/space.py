"""The search space, read from the policies' declared knobs (``Policy.KNOBS``).

Each policy kind contributes its knobs; a kind added later (an adaptive policy)
appears without changes here. A ``schedule`` knob is searched as three numbers,
first chunk, growth factor and cap (``8, x16, cap 256`` gives ``8,128,256``), or
pinned to an explicit list with ``fix``. Integer knobs named ``redundancy`` or
``tolerance`` are capped below the topology's fan-in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from staircase.errors import ConfigError
from staircase.policies import POLICY_KINDS, ChunkSchedule, Knob, PolicyConfig
from staircase.policies import config_of as policy_config
from staircase.topology import Topology

GROWTHS = (1, 2, 4, 8, 16)
SCHEDULE_FIRST = (1, 64)  # default range of a schedule's first chunk
SCHEDULE_CAP = (8, 512)  # default range of its cap
FAN_IN_KNOBS = ("redundancy", "tolerance")


@dataclass(frozen=True)
class Dim:
    """One searched number or choice (``name`` is ``kind.knob`` or ``kind.knob.part``)."""

    name: str
    kind: str  # "int", "float" or "choice"
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    log: bool = False

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def grid(self, points: int) -> list:
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            lo, hi = int(self.low), int(self.high)
            if hi - lo + 1 <= points:
                return list(range(lo, hi + 1))
            if self.log:
                return sorted({int(round(lo * (hi / lo) ** (i / (points - 1)))) for i in range(points)})
            return sorted({int(round(lo + (hi - lo) * i / (points - 1))) for i in range(points)})
        if points == 1:
            return [self.low]
        steps = [i / (points - 1) for i in range(points)]
        inner = [self.low * (self.high / self.low) ** f if self.log else self.low + (self.high - self.low) * f
                 for f in steps[1:-1]]
        return [self.low, *inner, self.high]  # the ends exactly


def schedule_sizes(first: int, growth: int, cap: int) -> tuple[int, ...]:
    """first, first x growth, ... up to cap (which then repeats)."""
    cap = max(cap, first)
    sizes = [first]
    while growth > 1 and sizes[-1] < cap:
        sizes.append(min(sizes[-1] * growth, cap))
    return tuple(sizes)


@dataclass
class KindSpace:
    kind: str
    fixed: dict = field(default_factory=dict)  # knob -> value
    dims: list[Dim] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)  # searched schedule knobs (three dims each)

    def params(self, values: dict) -> dict:
        """Constructor parameters from the dims' values (``{dim name: value}``)."""
        out = dict(self.fixed)
        for d in self.dims:
            knob = d.name.split(".")[1]
            if knob not in self.schedules:
                out[knob] = values[d.name]
        for knob in self.schedules:
            p = f"{self.kind}.{knob}."
            out[knob] = schedule_sizes(values[p + "first"], values[p + "growth"], values[p + "cap"])
        return out


class SearchSpace:
    """Policy configs a search may try: the union over ``kinds`` of each kind's knobs,
    less what ``fix`` pins, within ``ranges`` where given."""

    def __init__(self, kinds, topology: Topology, fix: dict | None = None, ranges: dict | None = None):
        kinds = list(dict.fromkeys(kinds))
        if not kinds:
            raise ConfigError("kinds", kinds, ", ".join(POLICY_KINDS))
        for k in kinds:
            if k not in POLICY_KINDS:
                raise ConfigError("kinds", k, ", ".join(POLICY_KINDS))
        fix, ranges = dict(fix or {}), dict(ranges or {})
        known = {f"{k}.{kn.name}" for k in kinds for kn in POLICY_KINDS[k].KNOBS}
        for name in list(fix) + list(ranges):
            if name not in known:
                raise ConfigError("space", name, f"knobs of the kinds searched: {', '.join(sorted(known)) or 'none'}")
        self.kinds = kinds
        self.topology = topology
        self.spaces = {k: self._kind_space(k, fix, ranges) for k in kinds}

    # --------------------------------------------------------------- building
    def _kind_space(self, kind: str, fix: dict, ranges: dict) -> KindSpace:
        ks = KindSpace(kind)
        fan_in = self.topology.min_fan_in
        for knob in POLICY_KINDS[kind].KNOBS:
            name = f"{kind}.{knob.name}"
            if name in fix:
                ks.fixed[knob.name] = _fixed_value(knob, name, fix[name])
                continue
            low, high = ranges.get(name, (knob.low, knob.high))
            if knob.name in FAN_IN_KNOBS and fan_in:
                high = min(high, fan_in - 1)
            if knob.kind == "schedule":
                ks.schedules.append(knob.name)
                ks.dims += _schedule_dims(name, knob, ranges.get(name))
            elif knob.kind == "choice":
                ks.dims.append(Dim(name, "choice", choices=tuple(knob.choices)))
            else:
                if low is None or high is None or low > high:
                    raise ConfigError(name, f"{low}..{high}", f"a non-empty range within [{knob.low}, {knob.high}]"
                                      + (f" and below the fan-in {fan_in}" if knob.name in FAN_IN_KNOBS else ""))
                for v in (low, high):
                    knob.check(int(v) if knob.kind == "int" else v)
                log = knob.kind == "float" and low > 0 and high / low > 10
                ks.dims.append(Dim(name, knob.kind, low, high, log=log))
        return ks

    # ------------------------------------------------------------- using it
    def suggest(self, trial) -> PolicyConfig:
        """The candidate an optuna trial proposes (define-by-run: the kind first)."""
        kind = trial.suggest_categorical("kind", self.kinds) if len(self.kinds) > 1 else self.kinds[0]
        ks = self.spaces[kind]
        return policy_config(kind, **ks.params({d.name: d.suggest(trial) for d in ks.dims}))

    def grid(self, points: int = 4) -> list[dict]:
        """Every combination of the dims' grid values, as optuna params (``kind`` included)."""
        out = []
        for kind, ks in self.spaces.items():
            names = [d.name for d in ks.dims]
            lowest = {d.name: min(d.grid(points)) for d in ks.dims if d.name.endswith(".cap")}
            for combo in itertools.product(*(d.grid(points) for d in ks.dims)):
                params = dict(zip(names, combo))
                if not _redundant_schedule(ks, params, lowest):
                    out.append(({"kind": kind} if len(self.kinds) > 1 else {}) | params)
        return out

    def config_of(self, params: dict) -> PolicyConfig:
        kind = params.get("kind", self.kinds[0])
        return policy_config(kind, **self.spaces[kind].params(params))

    def describe(self) -> dict:
        return {k: {"fixed": {n: list(v) if isinstance(v, tuple) else v for n, v in ks.fixed.items()},
                    "dims": [d.__dict__ | {"choices": list(d.choices)} for d in ks.dims]}
                for k, ks in self.spaces.items()}


def _fixed_value(knob: Knob, name: str, value):
    if knob.kind == "schedule":
        return ChunkSchedule.parse(value, name).sizes
    if knob.kind in ("int", "float"):
        try:
            value = int(value) if knob.kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, value, f"a {knob.kind}") from None
    knob.check(value)
    return value


def _schedule_dims(name: str, knob: Knob, given) -> list[Dim]:
    lo, hi = (given if given is not None else (max(knob.low, SCHEDULE_FIRST[0]), min(knob.high, SCHEDULE_CAP[1])))
    if lo is None or hi is None or lo > hi or lo < knob.low or hi > knob.high:
        raise ConfigError(name, f"{lo}..{hi}", f"a non-empty range of chunk sizes within [{knob.low}, {knob.high}]")
    first_hi = min(hi, max(lo, SCHEDULE_FIRST[1]))
    cap_lo = max(lo, min(hi, SCHEDULE_CAP[0]))
    return [Dim(f"{name}.first", "int", lo, first_hi, log=first_hi / lo > 4),
            Dim(f"{name}.growth", "choice", choices=GROWTHS),
            Dim(f"{name}.cap", "int", cap_lo, hi, log=hi / cap_lo > 4)]


def _redundant_schedule(ks: KindSpace, params: dict, lowest_cap: dict) -> bool:
    """Grid points whose schedules repeat another's: with growth 1, or a cap at or below
    the first chunk, the cap does not matter (only its lowest value is kept)."""
    for knob in ks.schedules:
        p = f"{ks.kind}.{knob}."
        first, growth, cap = params[p + "first"], params[p + "growth"], params[p + "cap"]
        if (growth == 1 or cap <= first) and cap != lowest_cap[p + "cap"]:
            return True
    return False


def parse_range(text: str) -> tuple[str, tuple[float, float]]:
    """``staircase.redundancy=0..2`` -> (name, (0, 2))."""
    name, _, rng = text.partition("=")
    lo, sep, hi = rng.partition("..")
    try:
        if not sep:
            raise ValueError
        return name.strip(), (float(lo), float(hi))
    except ValueError:
        raise ConfigError("range", text, "KIND.KNOB=LOW..HIGH, e.g. staircase.redundancy=0..2") from None


def parse_fix(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ConfigError("fix", text, "KIND.KNOB=VALUE, e.g. staircase.layout=prefix-cache or "
                          "staircase.proposer_schedule=8,128,256")
    return name.strip(), value.strip()

