"""The spec layer: a field's check and its JSON Schema entry say the same thing (they come
from one declaration), and an object of fields refuses what its schema refuses, naming
the field."""

from __future__ import annotations

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from staircase.deployment import POOL
from staircase.errors import ConfigError
from staircase.live.engines.config import ENGINE_SPECS, VLLM_ARGS
from staircase.sim.profile import DECODE, ENGINE, PREFILL
from staircase.policies import POLICY_KINDS
from staircase.spec import Field, ObjectSpec

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),  # (JSON has no infinities)
                   st.text(max_size=5), st.lists(st.integers(), max_size=2))
FIELDS = [Field("n", "int", low=1, high=64), Field("x", "float", low=0.0, open_low=True), Field("b", "bool"),
          Field("s", "str", nonblank=True), Field("e", "str", nonempty=True), Field("c", "choice", choices=("a", "b")),
          Field("z", "float", low=0.0, high=1.0, nullable=True)]
FIELDS += [f for spec in (POOL, VLLM_ARGS, ENGINE, PREFILL, DECODE, *ENGINE_SPECS.values()) for f in spec.fields
           if f.kind != "any"]  # (an "any" field's check is its loader's: the schema fuzz in test_fuzz.py covers it)
FIELDS += [p.field() for cls in POLICY_KINDS.values() for p in cls.SPEC if p.kind not in ("schedule", "name")]


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f"{f.name}:{f.kind}")
@settings(max_examples=150, deadline=None)
@given(value=VALUES)
def test_a_fields_check_and_its_schema_agree(field, value):
    valid = jsonschema.Draft202012Validator(field.schema()).is_valid(value)
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        valid = field.ok(value)  # JSON Schema's integer takes 2.0 too; the check does as well
    assert field.ok(value) == valid, (field, value, field.schema())
    if not valid:
        with pytest.raises(ConfigError, match=f"^{field.name}: got "):
            field.check(value)


def test_an_object_spec_fills_defaults_and_names_the_field_it_refuses():
    spec = ObjectSpec((Field("model", "str", required=True, nonempty=True), Field("replicas", "int", 1, low=1)))
    assert spec.check({"model": "m"}, "pool") == {"model": "m", "replicas": 1}
    for raw, field in (({"replicas": 2}, "pool.model"), ({"model": "m", "replicas": 0}, "pool.replicas"),
                       ({"model": "m", "extra": 1}, "pool.extra"), ([], "pool")):
        with pytest.raises(ConfigError) as err:
            spec.check(raw, "pool")
        assert str(err.value).startswith(f"{field}: got ")
    schema = spec.schema()
    assert schema["required"] == ["model"] and schema["properties"]["replicas"]["default"] == 1
    assert not jsonschema.Draft202012Validator(schema).is_valid({"model": "m", "extra": 1})
