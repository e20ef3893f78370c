"""Engines and slots as data: the config object every live command reads, its checks,
and the engines it builds.

A config names engines and maps the topology's slots to them::

    {"engines": {"a": {"kind": "vllm", "model": "smollm2"},
                 "b": {"kind": "serve", "model": "/models/x", "threads": "1"},
                 "c": {"kind": "http", "url": "http://10.0.0.2:8000", "model": "m", "api_key_env": "KEY"},
                 "d": {"kind": "replay", "answers": "answers.jsonl", "tokens_per_s": 30}},
     "slots": {"proposers": ["a", "b", "c"], "aggregator": "a"}}

``EngineOptions`` is the simple case the flags give (``--model``, ``--url``,
``--config``); ``engines_from_config`` checks every field and builds each engine once
(nothing starts: ``staircase.live.engines.factory.open_engines`` starts and stops them).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from staircase.deployment import Deployment, deployment_from_dict, parse_slots, replica_names, slots_schema
from staircase.errors import ConfigError
from staircase.spec import Field, ObjectSpec
from staircase.jsonio import read_json
from staircase.topology import Topology

from ..machine import DTYPES
from .base import Engine
from .http_engine import HTTPEngine, check_url
from .inprocess import VLLMEngine
from .replay import REPLAY, replay_from_spec
from .serve import ServeEngine, vllm_flags  # noqa: F401 (vllm_flags: part of the config's API)

ENGINE_KINDS = ("vllm", "serve", "http", "replay")
# vLLM engine arguments a vllm or serve engine passes through (``vllm_args``): name -> (type, minimum,
# what is allowed). On a GPU these are what a deployment sets; on vLLM's CPU build the machine's own
# settings (eager, whole prefills) come first and these override them.
VLLM_ARGS = ObjectSpec((
    Field("max_model_len", "int", low=16, allowed="an integer >= 16 (tokens; default 4096)"),
    Field("tensor_parallel_size", "int", low=1, allowed="an integer >= 1 (GPUs per engine)"),
    Field("gpu_memory_utilization", "float", low=0.05, high=1.0, allowed="a fraction in [0.05, 1]"),
    Field("max_num_batched_tokens", "int", low=16, allowed="an integer >= 16 (the chunked-prefill budget per step)"),
    Field("max_num_seqs", "int", low=1),
    Field("enable_chunked_prefill", "bool"),
    Field("devices", "str", nonblank=True, allowed='GPU indices as text ("0,1"): CUDA_VISIBLE_DEVICES of the engine'),
), what="an object of vLLM arguments")


_TEXT = dict(kind="str", nullable=True)
_CORES = {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]}
_MODEL = Field("model", "str", required=True, nonempty=True, allowed="smollm2 or a model folder with a config.json",
               help="smollm2 (bundled) or a model folder with a config.json")
_DTYPE = Field("dtype", "choice", choices=DTYPES, nullable=True,
               help="default: from the machine (staircase.live.machine.engine_settings)")
_VLLM_ARGS = Field("vllm_args", "any", json={"anyOf": [{"type": "null"}, VLLM_ARGS.schema(
    description="vLLM engine arguments passed through (a GPU deployment's settings)")]})
# Each engine kind's fields, declared once: build_engine's checks and the engines JSON Schema come from these
# (beyond them: a model folder exists, a serve engine's threads, a replay engine's answers or default answer).
ENGINE_SPECS = {
    "vllm": ObjectSpec((_MODEL, _DTYPE, _VLLM_ARGS), open=True),
    "serve": ObjectSpec((_MODEL, _DTYPE, _VLLM_ARGS, Field("threads", "any", json={"anyOf": [_CORES, {"type": "null"}, {
        "type": "array", "minItems": 1, "items": _CORES, "description": "with a deployment: one per replica"}]})),
        open=True),
    "http": ObjectSpec((Field("url", "any", required=True, allowed="an http:// or https:// base URL; with a deployment, "
                              "a list of those, one per replica", json={"anyOf": [
                                  {"type": "string", "pattern": "^https?://"},
                                  {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^https?://"},
                                   "description": "with a deployment: one per replica"}]}),
                        Field("model", **_TEXT), Field("api_key_env", **_TEXT), Field("tokenizer", **_TEXT)), open=True),
    "replay": REPLAY,
}


def check_vllm_args(name: str, raw: object) -> dict:
    """A vllm or serve engine's ``vllm_args``, checked (errors name the field): the keys given."""
    if raw is None:
        return {}
    checked = VLLM_ARGS.check(raw, f"config.engines.{name}.vllm_args")
    return {k: checked[k] for k in raw}


@dataclass(frozen=True)
class EngineOptions:
    """The engine flags: a config file, or one server (``url``) or one in-process model
    (``model``) for every slot. ``dtype``: for vllm/serve engines whose spec names none."""

    config: Path | None = None
    model: str = "smollm2"
    url: str | None = None
    served_model: str = "model"
    api_key_env: str | None = None
    dtype: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping) -> "EngineOptions":
        """From parsed flags as a mapping (``vars(args)``); keys it does not know are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def to_config(self) -> dict:
        """The engines-and-slots config object (read from ``config``, or made for one engine)."""
        if self.config is not None:
            return read_config(self.config)
        if self.url:
            return {"engines": {"remote": {"kind": "http", "url": self.url, "model": self.served_model,
                                           "api_key_env": self.api_key_env}},
                    "slots": {"proposers": ["remote"], "aggregator": "remote"}}
        return {"engines": {"local": {"kind": "vllm", "model": self.model}},
                "slots": {"proposers": ["local"], "aggregator": "local"}}


def read_config(path: Path) -> dict:
    return read_json(path, "config")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``EngineOptions`` reads (``staircase live``, ``calibrate``, ``quality``)."""
    g = p.add_argument_group("engines")
    g.add_argument("--config", type=Path, help="engines and slots as JSON (see above); overrides --model/--url")
    g.add_argument("--model", default="smollm2",
                   help="model folder for one in-process vLLM engine shared by every slot (default: bundled SmolLM2)")
    g.add_argument("--url", help="base URL of an OpenAI-compatible server for every slot instead of --model")
    g.add_argument("--served-model", default="model", help="--url: the model name the server expects")
    g.add_argument("--api-key-env", help="--url: name of the environment variable holding the API key")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="engine dtype for vllm/serve engines (default: from the machine: bfloat16 on CPUs with "
                        "native bf16 and on GPUs via auto, float32 on CPUs without; printed at start)")


def add_deployment_argument(p: argparse.ArgumentParser) -> None:
    """``--deployment FILE`` (``staircase live``, ``calibrate``): pools of the config's engines."""
    p.add_argument("--deployment", type=Path, default=None, metavar="FILE",
                   help="pools of replicas of the config's engines behind routers (JSON or YAML, "
                        "staircase/deployment.py; a pool's model names an engine of --config); its slots replace "
                        "the config's; serve replicas without threads split the cores")


def model_path(value: str, field: str = "model") -> Path:
    """``smollm2`` (the bundled model, converted once) or a model folder with a config.json."""
    if value == "smollm2":
        from ..model import smollm2_folder

        return smollm2_folder()
    path = Path(value)
    if not (path / "config.json").is_file():
        raise ConfigError(field, value, "smollm2 or a model folder with a config.json")
    return path


def build_engine(name: str, spec: object, dtype: str | None = None) -> Engine:
    """One engine entry of a config, its fields checked (errors name them)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"config.engines.{name}.kind", kind, ", ".join(ENGINE_KINDS))
    if kind == "replay":
        return replay_from_spec(name, spec)  # checks its fields (REPLAY), reads the answers file once
    ENGINE_SPECS[kind].check(spec, f"config.engines.{name}")
    if kind == "http":
        url = spec["url"]
        if not isinstance(url, str):
            raise ConfigError(f"config.engines.{name}.url", url, "an http:// or https:// base URL (a list, one per "
                              "replica, only with a deployment)")
        check_url(f"config.engines.{name}.url", url)
        return HTTPEngine(url, spec.get("model") or "model", name=name, api_key_env=spec.get("api_key_env"),
                          tokenizer_path=spec.get("tokenizer"))
    model = model_path(spec["model"], f"config.engines.{name}.model")
    vargs = check_vllm_args(name, spec.get("vllm_args"))
    if kind == "serve":
        threads = spec.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (str, int))
                                    or isinstance(threads, int) and threads < 0):
            raise ConfigError(f"config.engines.{name}.threads", threads,
                              "CPU cores as text (\"0-1\", \"2,3\") or one core's number; with a deployment, a "
                              "list of those, one per replica")
        return ServeEngine(model, name=name, threads=None if threads is None else str(threads),
                           dtype=spec.get("dtype") or dtype, vllm_args=vargs)
    return VLLMEngine(model, name=name, dtype=spec.get("dtype") or dtype, vllm_args=vargs)


@dataclass
class EngineSet:
    """The engines of a run: the deployment (pools of replicas, slots -> pools), each
    pool's replicas (``pools``, ``<pool>/<i>`` in order), and each slot's first replica
    (``slots``; what counts tokens and is checked for sessions). Without a deployment
    file every config engine is a pool of one, named as in the config."""

    config: dict
    deployment: Deployment
    pools: dict[str, list[Engine]]
    slots: dict[str, Engine]
    machine: dict = field(default_factory=dict)  # the machine and engine settings, once announced

    @property
    def used(self) -> list[Engine]:
        """The engines some slot runs on, each once (every replica of every used pool)."""
        used = {self.deployment.pool_for_slot(slot).name for slot in self.slots}
        return list({id(e): e for name in used for e in self.pools[name]}.values())


def engines_from_config(raw: object, topology: Topology, dtype: str | None = None,
                        deployment: Deployment | None = None) -> EngineSet:
    """Check a config object and build its engines (none started). ``dtype``: for
    vllm/serve engines whose spec names none (None: from the machine). ``deployment``:
    pools of replicas of the config's engines (a pool's ``model`` names an engine of
    the config); its slots replace the config's."""
    if not isinstance(raw, dict) or not isinstance(raw.get("engines"), dict) or not raw["engines"] \
            or "" in raw["engines"]:
        raise ConfigError("config.engines", raw.get("engines") if isinstance(raw, dict) else raw,
                          "an object of named engines (names not empty)")
    specs = raw["engines"]
    if deployment is None:
        deployment = _config_slots(raw, specs)
        pools = {name: [build_engine(name, specs[name], dtype)] for name in deployment.pools}
    else:
        deployment = deployment_from_dict(deployment.raw or deployment.to_dict(), models=list(specs))
        pools = _replicas(deployment, specs, dtype)
    slots = {n.slot: pools[deployment.pool_for_slot(n.slot).name][0] for n in topology.nodes}
    return EngineSet(raw, deployment, pools, slots)


def _config_slots(raw: dict, specs: dict) -> Deployment:
    """The config's own slots as a deployment: a pool of one per engine."""
    return Deployment.of_slots(*parse_slots(raw.get("slots") or {}, list(specs), "config", "engine"))


def _replicas(deployment: Deployment, specs: dict, dtype: str | None) -> dict[str, list[Engine]]:
    """Each pool's replicas, built from the config engine its ``model`` names. A ``serve``
    spec's ``threads`` may be a list (one per replica); without any, the machine's cores
    are split evenly among the deployment's ``serve`` replicas (one core each on 2 cores)."""
    unbound = [name for p in deployment.pools.values() if specs[p.model].get("kind") == "serve"
               and specs[p.model].get("threads") is None for name in replica_names(p)]
    cores = cores_for(len(unbound))
    pools = {}
    for p in deployment.pools.values():
        spec, built = specs[p.model], []
        each = {k: v for k in PER_REPLICA if isinstance(v := spec.get(k), list)}
        for key, values in each.items():
            if len(values) != p.replicas:
                raise ConfigError(f"config.engines.{p.model}.{key}", values,
                                  f"{PER_REPLICA[key]}: one per replica of pool {p.name} ({p.replicas}), or one for all")
        for i, name in enumerate(replica_names(p)):
            one = dict(spec) | {k: v[i] for k, v in each.items()}
            if name in unbound:
                one["threads"] = cores[unbound.index(name)]
            built.append(build_engine(name, one, dtype))
        pools[p.name] = built
    return pools


PER_REPLICA = {"threads": "CPU lists", "url": "base URLs"}  # fields a list gives one replica each of


def cores_for(n: int) -> list[str | None]:
    """``n`` CPU lists (``"0"``, ``"2-3"``) splitting this process's cores evenly; None
    each when there is nothing to split (one engine, or more engines than cores share
    them all)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if n <= 1 or n > len(cores):
        return [None] * n
    per = len(cores) // n
    parts = [cores[i * per:(i + 1) * per] for i in range(n)]
    return [str(c[0]) if len(c) == 1 else f"{c[0]}-{c[-1]}" if c == list(range(c[0], c[-1] + 1))
            else ",".join(map(str, c)) for c in parts]


SCHEMA_ID = "https://staircase.dev/schemas/engines.json"


def json_schema() -> dict:
    """The JSON Schema of an engines-and-slots config (``--config``). Beyond it: a
    ``model`` is ``smollm2`` or a folder with a config.json, ``api_key_env`` names a set
    environment variable, a replay ``answers`` file exists, the slots name engines of
    the config (and ``slots`` may be left out when a deployment file gives them)."""
    engine = {"oneOf": [{"title": kind, "type": "object",
                         "required": ["kind", *[f.name for f in spec.fields if f.required]],
                         "properties": {"kind": {"const": kind}, **spec.schema()["properties"]}}
                        for kind, spec in ENGINE_SPECS.items()]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "staircase engines and slots", "type": "object", "required": ["engines"],
            "properties": {"engines": {"type": "object", "minProperties": 1, "propertyNames": {"minLength": 1},
                                       "additionalProperties": engine},
                           "slots": slots_schema()}}
