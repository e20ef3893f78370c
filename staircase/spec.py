"""The spec layer: a field of a file format or a policy, declared once.

A ``Field`` says what one value may be (its kind, bounds, choices, default, help); from
it come the loader's check (``check``: the value, or a one-line ``ConfigError`` naming
the field, the value and what is allowed) and the published JSON Schema's entry
(``schema``), so the two cannot drift apart. An ``ObjectSpec`` is an object of named
fields (unknown keys refused, required ones checked, defaults filled in). Policy
parameters (``staircase.policies.Param``), deployment pools and vLLM arguments are
declared with them. Nothing below this module but the standard library and the error type.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import ConfigError

KINDS = ("int", "float", "bool", "str", "choice", "object", "any")
_MISSING = object()


@dataclass(frozen=True)
class Field:
    """One value: ``int`` / ``float`` within ``low`` .. ``high`` (``low`` open with
    ``open_low``; ``also``: values allowed beside the range), ``bool``, ``str`` (not
    blank, with ``nonblank``; not empty, with ``nonempty``), ``choice`` among ``choices``,
    ``object`` (a JSON object, its content not checked here), or ``any`` (checked
    elsewhere). ``nullable``: None is allowed too. ``allowed``: the error's words where
    the kind's own would say less."""

    name: str
    kind: str
    default: object = None
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    help: str = ""
    open_low: bool = False
    nullable: bool = False
    nonblank: bool = False
    nonempty: bool = False
    required: bool = False
    allowed: str = ""
    also: tuple = ()
    pattern: str = ""  # str: a regular expression the text must contain a match of
    json: Mapping | None = None  # any: the schema entry as written (the check is elsewhere)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Field {self.name}: kind {self.kind!r} not one of {KINDS}")

    def describe_allowed(self) -> str:
        """What the error says is allowed."""
        if self.allowed:
            return self.allowed
        if self.kind == "choice":
            return ", ".join(map(str, self.choices))
        if self.kind in ("bool", "str", "object", "any"):
            return {"bool": "true or false", "str": "a string", "object": "an object" + (" (or null)" if self.nullable
                                                                                          else ""),
                    "any": "a value"}[self.kind]
        what = "an integer" if self.kind == "int" else "a number"
        if self.low is None and self.high is None:
            return what
        if self.high is None:
            return f"{what} {'>' if self.open_low else '>='} {self.low:g}"
        return f"{what} in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"

    def ok(self, value: object) -> bool:
        if value is None and self.nullable:
            return True
        if self.kind == "any":
            return True
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "object":
            return isinstance(value, Mapping)
        if self.kind == "str":
            return isinstance(value, str) and (not self.nonblank or bool(value.strip())) and (
                not self.nonempty or bool(value)) and (not self.pattern or re.search(self.pattern, value) is not None)
        if self.kind == "choice":
            return isinstance(value, (str, int, float, bool, type(None))) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.kind == "int" and value != int(value):
            return False
        if value in self.also:
            return True
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, value: object, where: str = ""):
        """The value (an ``int`` for an int field, a ``float`` for a float one), or a
        ``ConfigError`` naming ``where`` (default: the field's name)."""
        if not self.ok(value):
            raise ConfigError(where or self.name, value, self.describe_allowed())
        if value is None or self.kind not in ("int", "float"):
            return value
        return int(value) if self.kind == "int" else float(value)

    def schema(self) -> dict:
        """This field's entry in a JSON Schema."""
        if self.kind == "choice":
            out: dict = {"enum": [*self.choices, *([None] if self.nullable and None not in self.choices else [])]}
        elif self.kind == "any":
            out = dict(self.json or {})
        else:
            name = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "object": "object"}[self.kind]
            out = {"type": [name, "null"] if self.nullable else name}
            if self.low is not None:
                out["exclusiveMinimum" if self.open_low else "minimum"] = self.low
            if self.high is not None:
                out["maximum"] = self.high
            if self.nonblank:
                out["pattern"] = r"\S"
            if self.nonempty:
                out["minLength"] = 1
            if self.pattern:
                out["pattern"] = self.pattern
            if self.also:
                ranged = {"type": name, **{k: v for k, v in out.items() if k != "type"}}
                out = {"anyOf": [*([{"type": "null"}] if self.nullable else []), *({"const": v} for v in self.also),
                                 ranged]}
        if self.help:
            out["description"] = self.help
        return out


@dataclass(frozen=True)
class ObjectSpec:
    """An object of named fields; what ``where`` names in errors (``deployment.pools.a``)."""

    fields: tuple[Field, ...]
    what: str = "an object"
    open: bool = False  # other keys allowed (and kept out of the checked result)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def check(self, raw: object, where: str) -> dict:
        """Every field of ``raw`` checked, defaults filled in; unknown keys refused."""
        if not isinstance(raw, Mapping):
            raise ConfigError(where, raw, f"{self.what} with {_listed(self.names)}")
        unknown = [] if self.open else sorted(set(raw) - set(self.names))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", raw[unknown[0]], ", ".join(self.names))
        out = {}
        for f in self.fields:
            value = raw.get(f.name, _MISSING)
            if value is _MISSING and not f.required:
                out[f.name] = f.default
                continue
            out[f.name] = f.check(None if value is _MISSING else value, f"{where}.{f.name}")
        return out

    def schema(self, **more) -> dict:
        """The object's JSON Schema (``more``: further keywords, e.g. a title)."""
        props = {}
        for f in self.fields:
            props[f.name] = f.schema() | ({"default": f.default} if f.default is not None and not f.required else {})
        required = [f.name for f in self.fields if f.required]
        closed = {} if self.open else {"additionalProperties": False}
        return {"type": "object", **closed, **({"required": required} if required else {}), "properties": props, **more}


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
