"""Engine latency profiles (JSON): a few fitted parameters per engine model.

    prefill_s(P, K)       = base + per_token * P + per_token2 * P^2 + per_token_cached * P * K
                            (P: uncached prompt tokens, K: cached ones; per_token_cached, the
                            new tokens' attention over the cached context, is optional: 0)
    decode_iteration_s    = base + per_seq * B + per_context_token * C  (B: batch size, C: context tokens in batch)
    request_overhead_s    = constant per call (network, API front end)
    max_num_batched_tokens  (optional) tokens per engine step: vLLM's chunked prefill. A prompt
                            longer than what the step's running decodes leave of it is prefilled
                            over several steps, each mixed with the decodes; 0 or absent: whole
                            prompts in one step (the CPU build, with chunked prefill off)

A GPU engine profile built from a kernel database (``staircase profile``) also records
``provenance``, ``fit_error`` and ``overheads`` (what the database omits, as named
terms already added into the coefficients); the simulator reads only the numbers.

Each of the three is multiplied by noise drawn from a scipy.stats distribution
named in the profile (``{"dist": "lognorm", "params": {"s": 0.1, "scale": 1.0}}``).
Proposer answer lengths are the request's output length times a draw from
``lengths.proposer_factor``.

``slots`` maps topology slots to engine models: ``proposer-i`` runs ``proposers[i % n]``,
the final node runs ``aggregator``. With ``engine_sharing: "per-slot"`` every slot has
its own engine instance (several layers or rounds share their slot's engine); with
``"one"`` all slots share a single engine of the aggregator's model (one server
hosting every agent).

Bundled profiles live in ``staircase/data/profiles/``; the simulator asks for them by name
(``staircase.bundled``), never through the ``calibration`` package (calibration imports
sim, never the other way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import scipy.stats

from staircase import bundled
from staircase.deployment import parse_slots, slots_schema
from staircase.errors import ConfigError
from staircase.jsonio import read_json
from staircase.spec import Field, ObjectSpec
from staircase.topology import slot_target

SCHEMA = "staircase-profile/1"
SHARING = ("per-slot", "one")


def default_profile_path() -> Path:
    return bundled.PROFILES / "default.json"


@dataclass(frozen=True)
class Noise:
    """A multiplicative noise distribution (None: no noise)."""

    dist: str
    params: dict

    def frozen(self):
        return getattr(scipy.stats, self.dist)(**self.params)

    def to_json(self) -> dict:
        return {"dist": self.dist, "params": self.params}


@dataclass(frozen=True)
class EngineModel:
    name: str
    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_token2_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_context_token_s: float
    request_overhead_s: float
    max_batch_size: int
    kv_cache_tokens: int
    block_size_tokens: int
    noise: dict[str, Noise | None] = field(default_factory=dict)
    prefill_per_token_cached_s: float = 0.0  # per (uncached x cached) token pair of a call
    max_num_batched_tokens: int = 0  # tokens per engine step (vLLM's chunked prefill); 0: whole prompts

    def prefill_s(self, uncached_tokens: float, squares: float | None = None, cross: float = 0.0) -> float:
        """A prefill of ``uncached_tokens`` (``squares``: the sum of each call's squared
        uncached tokens, for a batch; ``cross``: the sum of uncached x cached tokens)."""
        sq = uncached_tokens * uncached_tokens if squares is None else squares
        return (self.prefill_base_s + self.prefill_per_token_s * uncached_tokens + self.prefill_per_token2_s * sq
                + self.prefill_per_token_cached_s * cross)

    def decode_iteration_s(self, batch: int, context_tokens: float) -> float:
        return self.decode_base_s + self.decode_per_seq_s * batch + self.decode_per_context_token_s * context_tokens


@dataclass(frozen=True)
class Profile:
    name: str
    calibrated: bool
    note: str
    engines: dict[str, EngineModel]
    proposer_engines: tuple[str, ...]
    aggregator_engine: str
    engine_sharing: str
    proposer_length_factor: Noise | None
    source: str = ""
    machine: dict | None = None  # where it was calibrated (``staircase.machine``); None if not recorded
    raw: dict = field(default_factory=dict, compare=False)

    def engine_for_slot(self, slot: str) -> tuple[str, EngineModel]:
        """(engine instance name, its model) for a topology slot."""
        if self.engine_sharing == "one":
            return "shared", self.engines[self.aggregator_engine]
        model = slot_target(slot, self.proposer_engines, self.aggregator_engine)
        return f"{slot}:{model}", self.engines[model]


def _noise(raw, where: str) -> Noise | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "dist" not in raw:
        raise ConfigError(where, raw, 'null or {"dist": <scipy.stats name>, "params": {...}}')
    name, params = raw["dist"], raw.get("params", {})
    dist = getattr(scipy.stats, str(name), None)
    if not isinstance(dist, scipy.stats.rv_continuous):
        raise ConfigError(f"{where}.dist", name, "a continuous scipy.stats distribution, e.g. lognorm, gamma")
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params", params, "an object of the distribution's keyword parameters")
    try:
        frozen = dist(**params)
        mean = float(frozen.mean())
        if not math.isfinite(mean) or frozen.support()[0] < 0:
            raise ValueError
    except Exception:
        raise ConfigError(f"{where}.params", params, f"valid parameters of scipy.stats.{name} with support >= 0") from None
    return Noise(str(name), dict(params))


def _coefficient(name: str, required: bool = True) -> Field:
    return Field(name, "float", 0.0, low=0.0, required=required)


# An engine model's fields, declared once: the loader's checks and the profile JSON Schema come from these.
PREFILL = ObjectSpec((_coefficient("base"), _coefficient("per_token"), _coefficient("per_token2"),
                      _coefficient("per_token_cached", required=False)), what="an object of coefficients", open=True)
DECODE = ObjectSpec((_coefficient("base"), _coefficient("per_seq"), _coefficient("per_context_token")),
                    what="an object of coefficients", open=True)
ENGINE = ObjectSpec((
    Field("request_overhead_s", "float", low=0.0, required=True),
    Field("max_batch_size", "int", low=1, required=True),
    Field("kv_cache_tokens", "int", low=1, required=True),
    Field("block_size_tokens", "int", low=1, required=True),
    Field("max_num_batched_tokens", "int", 0, low=2, also=(0,), nullable=True,
          allowed="0 (whole prompts in one step) or a budget of at least 2 tokens per step",
          help="tokens per engine step (chunked prefill); 0 or absent: whole prompts in one step"),
    Field("provenance", "object", nullable=True, help="where the numbers come from (database, versions, GPU)"),
    Field("fit_error", "object", nullable=True, help="the form's error against its source"),
    Field("overheads", "object", nullable=True, help="named terms added to the source's step times"),
), what="an object with prefill_s, decode_iteration_s, request_overhead_s, ...", open=True)
NOISE_KEYS = ("prefill", "decode", "overhead")


def _engine(name: str, raw: dict) -> EngineModel:
    where = f"engines.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, f"{ENGINE.what}")
    pre, dec = PREFILL.check(raw.get("prefill_s"), f"{where}.prefill_s"), DECODE.check(raw.get("decode_iteration_s"),
                                                                                        f"{where}.decode_iteration_s")
    own = ENGINE.check(raw, where)
    noise_raw = {} if raw.get("noise") is None else raw["noise"]
    if not isinstance(noise_raw, dict):
        raise ConfigError(f"{where}.noise", noise_raw, "an object with prefill, decode, overhead")
    unknown = set(noise_raw) - set(NOISE_KEYS)
    if unknown:
        raise ConfigError(f"{where}.noise", sorted(unknown), "keys prefill, decode, overhead")
    model = EngineModel(
        name=name, prefill_base_s=pre["base"], prefill_per_token_s=pre["per_token"],
        prefill_per_token2_s=pre["per_token2"], decode_base_s=dec["base"], decode_per_seq_s=dec["per_seq"],
        decode_per_context_token_s=dec["per_context_token"], request_overhead_s=own["request_overhead_s"],
        max_batch_size=own["max_batch_size"], kv_cache_tokens=own["kv_cache_tokens"],
        block_size_tokens=own["block_size_tokens"],
        noise={k: _noise(noise_raw.get(k), f"{where}.noise.{k}") for k in NOISE_KEYS},
        prefill_per_token_cached_s=pre["per_token_cached"], max_num_batched_tokens=own["max_num_batched_tokens"] or 0,
    )
    if model.decode_base_s + model.decode_per_seq_s <= 0:
        raise ConfigError(f"{where}.decode_iteration_s.base", model.decode_base_s, "a positive iteration time")
    return model


def _check_types(raw: dict) -> None:
    """The profile's descriptive fields, when given, have their types."""
    kinds = {"name": (str, "a string"), "note": (str, "a string"), "calibrated": (bool, "true or false"),
             "lengths": (dict, 'an object: {"proposer_factor": <noise>}'),
             "machine": (dict, "an object describing the machine (cpu_model, cpu_isa, ...)")}
    for key, (kind, allowed) in kinds.items():
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise ConfigError(f"profile.{key}", raw[key], allowed)


def parse_profile(raw: dict, source: str = "<dict>") -> Profile:
    if not isinstance(raw, dict):
        raise ConfigError("profile", type(raw).__name__, "a JSON object")
    if raw.get("schema") != SCHEMA:
        raise ConfigError("profile.schema", raw.get("schema"), SCHEMA)
    engines_raw = raw.get("engines")
    if not isinstance(engines_raw, dict) or not engines_raw or "" in engines_raw:
        raise ConfigError("profile.engines", engines_raw, "a non-empty object of named engine models (names not empty)")
    engines = {name: _engine(name, e) for name, e in engines_raw.items()}
    proposers, aggregator = parse_slots(raw.get("slots"), list(engines), "profile", "engine model")
    sharing = raw.get("engine_sharing", "per-slot")
    if sharing not in SHARING:
        raise ConfigError("profile.engine_sharing", sharing, ", ".join(SHARING))
    _check_types(raw)
    lengths = raw.get("lengths") or {}
    machine = raw.get("machine")
    return Profile(
        name=raw.get("name") or Path(source).stem,
        calibrated=bool(raw.get("calibrated", False)),
        note=raw.get("note") or "",
        engines=engines,
        proposer_engines=tuple(proposers),
        aggregator_engine=aggregator,
        engine_sharing=sharing,
        proposer_length_factor=_noise(lengths.get("proposer_factor"), "profile.lengths.proposer_factor"),
        source=source,
        machine=machine,
        raw=raw,
    )


def bundled_profiles() -> list[str]:
    return bundled.profile_names()


def load_profile(path: Path | str | None = None) -> Profile:
    """Read and check a profile: a JSON file, a bundled profile's name (``default``,
    ``illustrative-gpu``), or ``None`` for the bundled default."""
    path = Path(path) if path is not None else default_profile_path()
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1 and bundled.profile_file(str(path)):
        path = bundled.profile_file(str(path))
    elif not path.is_file() and path.parent.parts[-2:] == ("calibration", "profiles") and bundled.profile_file(path.stem):
        path = bundled.profile_file(path.stem)  # where runs recorded before staircase/data named it
    if not path.is_file():
        raise ConfigError("profile", str(path), "an existing profile JSON file or a bundled profile: "
                          + ", ".join(bundled_profiles()))
    return parse_profile(read_json(path, "profile"), str(path))


def json_schema() -> dict:
    """The JSON Schema of a profile file. Beyond it: a noise ``dist`` names a continuous
    scipy.stats distribution whose ``params`` give a finite mean and support >= 0; the
    slots name engines of the profile; decode's base + per_seq > 0."""
    noise = {"anyOf": [{"type": "null"}, {"type": "object", "required": ["dist"], "properties": {
        "dist": {"type": "string", "description": "a scipy.stats continuous distribution, e.g. lognorm"},
        "params": {"type": "object", "description": "its keyword parameters"}}}]}
    own = ENGINE.schema()
    engine = own | {"required": ["prefill_s", "decode_iteration_s", *own["required"]],
                    "properties": {"prefill_s": PREFILL.schema(), "decode_iteration_s": DECODE.schema(),
                                   **own["properties"],
                                   "noise": {"anyOf": [{"type": "null"}, {"type": "object", "additionalProperties": False,
                                                                         "properties": {k: noise for k in NOISE_KEYS}}]}}}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://staircase.dev/schemas/profile.json",
            "title": "staircase latency profile", "type": "object", "required": ["schema", "engines", "slots"],
            "properties": {"schema": {"const": SCHEMA}, "name": {"type": ["string", "null"]},
                           "note": {"type": ["string", "null"]}, "calibrated": {"type": ["boolean", "null"]},
                           "machine": {"type": ["object", "null"]},
                           "engines": {"type": "object", "minProperties": 1, "propertyNames": {"minLength": 1},
                                       "additionalProperties": engine},
                           "slots": slots_schema(),
                           "engine_sharing": {"enum": list(SHARING)},
                           "lengths": {"anyOf": [{"type": "null"}, {"type": "object",
                                                                    "properties": {"proposer_factor": noise}}]}}}
