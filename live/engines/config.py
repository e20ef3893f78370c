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
(nothing starts: ``live.engines.factory.open_engines`` starts and stops them).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from staircase.errors import ConfigError
from staircase.topology import Topology, slot_target

from ..machine import DTYPES
from .base import Engine
from .http_engine import HTTPEngine, check_url
from .inprocess import VLLMEngine
from .replay import replay_from_spec
from .serve import ServeEngine

ENGINE_KINDS = ("vllm", "serve", "http", "replay")


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
    if not path.is_file():
        raise ConfigError("config", str(path), "an existing JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("config", str(path), f"valid JSON ({err.msg}, line {err.lineno})") from None


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
        return replay_from_spec(name, spec)  # reads the answers file, once
    if kind == "http":
        url = check_url(f"config.engines.{name}.url", spec.get("url"))
        return HTTPEngine(url, spec.get("model", "model"), name=name, api_key_env=spec.get("api_key_env"),
                          tokenizer_path=spec.get("tokenizer"))
    if spec.get("dtype") is not None and spec["dtype"] not in DTYPES:
        raise ConfigError(f"config.engines.{name}.dtype", spec["dtype"], ", ".join(DTYPES))
    model = model_path(str(spec.get("model", "")), f"config.engines.{name}.model")
    if kind == "serve":
        threads = str(spec["threads"]) if spec.get("threads") is not None else None
        return ServeEngine(model, name=name, threads=threads, dtype=spec.get("dtype") or dtype)
    return VLLMEngine(model, name=name, dtype=spec.get("dtype") or dtype)


@dataclass
class EngineSet:
    """The engines of a config (``by_name``) and the topology's slots mapped to them
    (``slots``; slots that share an engine share the object)."""

    config: dict
    by_name: dict[str, Engine]
    slots: dict[str, Engine]
    machine: dict = field(default_factory=dict)  # the machine and engine settings, once announced

    @property
    def used(self) -> list[Engine]:
        """The engines some slot runs on, each once."""
        return list({id(e): e for e in self.slots.values()}.values())


def engines_from_config(raw: object, topology: Topology, dtype: str | None = None) -> EngineSet:
    """Check a config object and build its engines (none started). ``dtype``: for
    vllm/serve engines whose spec names none (None: from the machine)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("engines"), dict) or not raw["engines"]:
        raise ConfigError("config.engines", raw.get("engines") if isinstance(raw, dict) else raw,
                          "an object of named engines")
    specs = raw["engines"]
    by_name = {name: build_engine(name, spec, dtype) for name, spec in specs.items()}
    slots = raw.get("slots") or {}
    proposers = slots.get("proposers")
    if not isinstance(proposers, list) or not proposers or any(p not in specs for p in proposers):
        raise ConfigError("config.slots.proposers", proposers, f"a list of engine names from {', '.join(specs)}")
    if slots.get("aggregator") not in specs:
        raise ConfigError("config.slots.aggregator", slots.get("aggregator"), f"one of {', '.join(specs)}")
    mapping = {n.slot: by_name[slot_target(n.slot, proposers, slots["aggregator"])] for n in topology.nodes}
    return EngineSet(raw, by_name, mapping)
