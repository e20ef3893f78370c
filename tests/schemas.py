"""Hypothesis strategies from the JSON Schemas the project publishes (the subset they
use: type, enum, const, anyOf/oneOf, properties, required, additionalProperties,
minProperties, items, minItems, minimum/maximum/exclusiveMinimum, minLength,
pattern). hypothesis-jsonschema would do this but fails against the hypothesis this
project installs (``'many' object has no attribute 'more'``)."""

from __future__ import annotations

from hypothesis import strategies as st

KEYS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
LEAVES = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=12)
FREE = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                    max_leaves=6)  # what a free-form object holds (a profile's machine, a noise's params)


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values the schema accepts."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s) for s in schema[key]])
    kinds = schema.get("type")
    if isinstance(kinds, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kinds])
    return _TYPES[kinds](schema) if kinds in _TYPES else FREE


def _number(schema: dict, integer: bool) -> st.SearchStrategy:
    low, high = schema.get("minimum"), schema.get("maximum")
    above = schema.get("exclusiveMinimum")
    if integer:
        return st.integers(None if low is None else int(low), None if high is None else int(high))
    values = st.floats(low if above is None else above, high, allow_nan=False, allow_infinity=False,
                       exclude_min=above is not None)
    return values if low is not None or above is not None else values | st.integers(-10**6, 10**6)


def _string(schema: dict) -> st.SearchStrategy:
    if "pattern" in schema:
        return st.from_regex(schema["pattern"], fullmatch=False).filter(lambda s: len(s) >= schema.get("minLength", 0))
    return st.text(min_size=schema.get("minLength", 0), max_size=16)


@st.composite
def _object(draw, schema: dict):
    props, required = schema.get("properties", {}), set(schema.get("required", []))
    out = {k: draw(from_schema(props[k])) for k in props if k in required or draw(st.booleans())}
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        more = draw(st.dictionaries(KEYS.filter(lambda k: k not in props), from_schema(extra),
                                    min_size=max(0, schema.get("minProperties", 0) - len(out)), max_size=3))
        out.update(more)
    elif extra is None and not props:
        out.update(draw(st.dictionaries(KEYS, FREE, max_size=3)))
    return out


def _array(schema: dict) -> st.SearchStrategy:
    return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0), max_size=4)


_TYPES = {"integer": lambda s: _number(s, True), "number": lambda s: _number(s, False), "string": _string,
          "boolean": lambda s: st.booleans(), "null": lambda s: st.none(), "object": _object, "array": _array}


def paths(value, prefix=(), skip=("machine", "params")):
    """Every path into ``value`` (dict keys, list indices), not into free-form objects."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            if k not in skip:
                yield from paths(v, prefix + (k,), skip)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield prefix + (i,)
            yield from paths(v, prefix + (i,), skip)


def replaced(value, path, new):
    """A copy of ``value`` with the item at ``path`` replaced by ``new``."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(copy[path[0]], path[1:], new)
    return copy
