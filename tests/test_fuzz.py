"""Inputs nobody wrote by hand: hypothesis generates arbitrary JSON (and text) for every
config a user gives — policy configs, deployment files, engine configs, profiles (and
mutations of a real one), prompt files, arrival files, Azure-format traces, the
search/plan/best files `--policy-config` reads — and the only exception that may come
out is the project's own one-line error (``StaircaseError``: it names the field, the
value and what is allowed; the CLI prints it and exits 2). A TypeError, KeyError or
AttributeError here is a traceback a user would see. Then arbitrary values for the
options of every command: exit 0 or exit 2 with one line and no results folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from staircase.errors import StaircaseError, one_line

KEYS = ["kind", "redundancy", "layout", "name", "proposer_schedule", "aggregator_schedule", "scope", "pools", "slots",
        "model", "replicas", "router", "engines", "proposers", "aggregator", "url", "threads", "answers",
        "default_answer", "tokens_per_s", "first_token_s", "dtype", "best", "policies", "met", "config",
        "cost_per_hour", "schema", "max_batch_size", "kv_cache_tokens", "decode_base_s", "noise"]
SCALARS = (st.none() | st.booleans() | st.integers(-10, 10**7) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8) | st.sampled_from(["staircase", "wait-all", "affinity", "vllm", "replay", "first"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=6), max_leaves=30)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def only_our_errors(fn, raw) -> None:
    try:
        fn(raw)
    except StaircaseError as err:
        assert str(err) and "\n" not in str(err)  # one line


def _engines(raw):
    from staircase.live.engines import engines_from_config
    from staircase.topology import moa

    engines_from_config(raw, moa(3))


def _profile_mutated(raw):
    from staircase.sim.profile import load_profile, parse_profile

    base = json.loads(json.dumps(load_profile().raw))
    if isinstance(raw, dict):
        base.update(raw)
        engines = base.get("engines")
        for name in list(engines)[:1] if isinstance(engines, dict) else []:  # (raw may have replaced them)
            if isinstance(engines[name], dict):
                base["engines"][name].update({k: v for k, v in raw.items() if k not in base})
    parse_profile(base)


def _parsers():
    from staircase.sim.profile import parse_profile
    from staircase.deployment import deployment_from_dict
    from staircase.policies import policy_from_dict

    return {"policy config": policy_from_dict, "deployment": deployment_from_dict, "engines config": _engines,
            "profile": parse_profile, "profile (a real one, mutated)": _profile_mutated}


@pytest.mark.parametrize("kind", list(_parsers()))
def test_config_objects_fail_only_with_a_named_error(kind):
    fn = _parsers()[kind]

    @FUZZ
    @given(raw=JSON)
    def run(raw):
        only_our_errors(fn, raw)
    run()


@pytest.mark.parametrize("kind", ["policy-config file", "prompts", "arrivals", "deployment file"])
def test_files_fail_only_with_a_named_error(kind, tmp_path):
    from staircase.workload import read_arrivals as load_arrivals
    from staircase.live.prompts import load_prompts
    from staircase.deployment import load_deployment
    from staircase.runconfig import policies_from_option

    path = tmp_path / "input.json"
    read = {"policy-config file": lambda: policies_from_option(str(path)),
            "prompts": lambda: load_prompts(str(path)), "arrivals": lambda: load_arrivals(path),
            "deployment file": lambda: load_deployment(path)}[kind]

    @FUZZ
    @given(content=JSON.map(json.dumps) | st.lists(JSON.map(json.dumps), max_size=4).map("\n".join) | st.text())
    def run(content):
        path.write_text(content)
        only_our_errors(lambda _: read(), None)
    run()


def test_azure_format_traces_fail_only_with_a_named_error(tmp_path):
    from staircase.workload import read_azure

    path = tmp_path / "trace.csv"
    cell = st.integers(-5, 10**6).map(str) | st.text(max_size=6) | st.just("2023-11-16 18:15:46.6805900")
    rows = st.lists(st.lists(cell, min_size=3, max_size=3).map(",".join), max_size=5)
    header = st.sampled_from(["TIMESTAMP,ContextTokens,GeneratedTokens", "TIMESTAMP,ContextTokens", "a,b,c", ""])

    @FUZZ
    @given(head=header, body=rows)
    def run(head, body):
        path.write_text("\n".join([head, *body]) + "\n")
        only_our_errors(lambda _: read_azure(path), None)
    run()


def test_a_plan_file_with_odd_entries_fails_with_a_named_error(tmp_path):
    from staircase.runconfig import policies_from_option

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"policies": {"a": {"met": True, "cost_per_hour": "x", "config": {"kind": "wait-all"}},
                                             "b": {"met": True, "cost_per_hour": 3}}}))
    with pytest.raises(StaircaseError, match="policy"):
        policies_from_option(str(path))
    path.write_text(json.dumps({"policies": {"a": {"met": True, "cost_per_hour": "x", "config": {"kind": "wait-all"}},
                                             "b": {"met": True, "cost_per_hour": 3,
                                                   "config": {"kind": "staircase", "redundancy": 1}}}}))
    assert [p.name for p in policies_from_option(str(path))][0].startswith("staircase")  # the priced one first


# ------------------------------------------------------------------ every command's options
class ReachedTheEngines(BaseException):
    """Raised in place of opening engines: the command accepted its options."""


def _refuse_engines(*args, **kwargs):
    raise ReachedTheEngines()


OPTION_VALUES = (st.integers(-3, 4).map(str)
                 | st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-9", "", ",", "0,0", "-1,5", "abc", "{}", "[]",
                                    ".", "/", '{"kind": 3}', "/no/such", "1..2", "a=b", "=", "x.y=1", "p0=0.5", "ttft_p90<=x"])
                 | st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8))
NOT_FUZZED = {"--help", "--out", "--format", "--no-figure", "--progress", "--no-progress", "--requests",
              "--summary-only", "--ray", "--workers", "--rescore", "--port", "--host"}
SIM_SIDE = {"sim": 60, "search": 40, "plan": 60, "validate": 20}  # real (small) runs when the options are good
ENGINE_SIDE = {"live": 60, "serve": 60, "quality": 60, "calibrate": 60}  # stopped where the engines would open


def _options(command: str) -> list:
    import argparse

    from staircase.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [a for a in sub._actions if a.option_strings and a.option_strings[-1] not in NOT_FUZZED and a.nargs != 0]


@pytest.mark.parametrize("command", [*SIM_SIDE, *ENGINE_SIDE])
def test_every_commands_options_fail_in_one_line_and_leave_no_results_folder(command, tmp_path, monkeypatch):
    """Arbitrary values (numbers out of range, NaN, text, JSON, paths that do not exist) for
    one to three options of each command: exit 0 (the simulator-side commands run a
    20-request job) or exit 2 with one line and no traceback, and on exit 2 no results
    folder; the engine-side commands either refuse their options or reach the point
    where engines would open (replaced here by an exception)."""
    import contextlib
    import io
    import shutil

    import staircase.live.cli
    import staircase.live.engines
    from staircase.cli import main

    monkeypatch.setattr(staircase.live.engines, "open_engines", _refuse_engines)
    monkeypatch.setattr(staircase.live.cli, "open_engines", _refuse_engines)
    options = _options(command)
    fixed = ["benchmarks/results/lead-in-live"] if command == "validate" else []
    fixed += ["--requests", "20"] if command in SIM_SIDE and command != "validate" else []
    tried = {"refused": 0, "accepted": 0}

    @settings(FUZZ, max_examples=(SIM_SIDE | ENGINE_SIDE)[command])
    @given(st.lists(st.tuples(st.sampled_from(options), OPTION_VALUES), min_size=1, max_size=3))
    def check(pairs):
        out = tmp_path / "run"
        argv = [command, *[x for a, v in pairs for x in (a.option_strings[-1], v)], *fixed, "--out", str(out)]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
        except SystemExit as exit_:  # argparse: a value of the wrong type or choice
            rc = exit_.code
        except ReachedTheEngines:
            rc = 0
        text = "\n".join(line for line in err.getvalue().splitlines() if line.strip() and not line.startswith("note:"))
        assert rc in (0, 2), (argv, rc, text[-500:])
        if rc == 2:
            assert len(text.splitlines()) == 1 and "Traceback" not in text, (argv, text[-500:])
            assert not out.exists(), (argv, "a results folder was left on exit 2")
        tried["refused" if rc == 2 else "accepted"] += 1
        shutil.rmtree(out, ignore_errors=True)

    check()
    assert tried["refused"] > 0


# ------------------------------------------------------------- from the published schemas
def _schemas():
    """kind -> (its JSON Schema, a repair that meets the checks beyond the schema, the loader)."""
    from staircase.live.engines.config import json_schema as engines_schema
    from staircase.sim.profile import json_schema as profile_schema
    from staircase.sim.profile import parse_profile
    from staircase.deployment import deployment_from_dict
    from staircase.deployment import json_schema as deployment_schema
    from staircase.policies import json_schema as policy_schema
    from staircase.policies import policy_from_dict

    return {"policy config": (policy_schema(), _repair_policy, policy_from_dict),
            "engine config": (engines_schema(), _repair_engines, _engines),
            "profile": (profile_schema(), _repair_profile, parse_profile),
            "deployment": (deployment_schema(), _repair_deployment, deployment_from_dict)}


def _repair_policy(raw: dict) -> dict:
    """min_chunk <= max_chunk (their defaults: 2 and 256)."""
    low, high = raw.get("min_chunk", 2), raw.get("max_chunk", 256)
    if low > high:
        raw["min_chunk"], raw["max_chunk"] = high, low
    return raw


ANSWERS = str(Path(__file__).parent / "data" / "fuzz-answers.jsonl")


def _repair_engines(raw: dict) -> dict:
    """Models the bundled one, answers a real file, keys from a set variable, slots
    naming the config's engines, one URL or CPU list where no deployment gives replicas:
    what the schema cannot say."""
    for spec in raw["engines"].values():
        if spec["kind"] in ("vllm", "serve"):
            spec["model"] = "smollm2"
            if isinstance(spec.get("threads"), list):
                spec["threads"] = spec["threads"][0]
        if spec["kind"] == "http" and isinstance(spec.get("url"), list):
            spec["url"] = spec["url"][0]  # (a list only with a deployment, one per replica: loaded without one)
        if spec.get("api_key_env") is not None:
            spec["api_key_env"] = "HOME"
        if spec["kind"] == "replay":
            spec["tokenizer"] = None
            if "answers" in spec or spec.get("default_answer") is None:
                spec["answers"] = ANSWERS
    names = sorted(raw["engines"])
    raw["slots"] = {"proposers": names, "aggregator": names[-1]}
    return raw


def _repair_profile(raw: dict) -> dict:
    for engine in raw["engines"].values():
        noise = engine.get("noise") or {}
        for key in noise:
            if noise[key] is not None:
                noise[key] = {"dist": "lognorm", "params": {"s": 0.1}}
        engine["decode_iteration_s"]["base"] = max(engine["decode_iteration_s"]["base"], 1e-4)
    if isinstance(raw.get("lengths"), dict) and raw["lengths"].get("proposer_factor") is not None:
        raw["lengths"]["proposer_factor"] = {"dist": "uniform", "params": {"loc": 0.5, "scale": 1.0}}
    names = sorted(raw["engines"])
    raw["slots"] = {"proposers": names, "aggregator": names[-1]}
    return raw


def _repair_deployment(raw: dict) -> dict:
    names = sorted(raw["pools"])
    raw["slots"] = {"proposers": names, "aggregator": names[-1]}
    return raw


def relinked(raw: dict, path: tuple) -> dict:
    """Slots naming the engines (pools) again after a change elsewhere renamed them: the
    error should be about the change, not about the slots."""
    named = raw.get("engines", raw.get("pools"))
    if path[0] != "slots" and isinstance(named, dict) and named and "slots" in raw:
        names = sorted(named)
        raw = {**raw, "slots": {"proposers": names, "aggregator": names[-1]}}
    return raw


# 120 per schema and direction in the suite; STAIRCASE_FUZZ_EXAMPLES=2000 for a long run
SCHEMA_FUZZ = settings(max_examples=int(os.environ.get("STAIRCASE_FUZZ_EXAMPLES", 120)), deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("kind", ["policy config", "engine config", "profile", "deployment"])
def test_what_a_published_schema_allows_loads(kind):
    """An instance drawn from the schema (and meeting the checks the schema describes
    in words) loads."""
    import jsonschema

    from schemas import from_schema

    schema, repair, load = _schemas()[kind]
    check = jsonschema.Draft202012Validator(schema)

    @SCHEMA_FUZZ
    @given(from_schema(schema))
    def loads(raw):
        raw = repair(json.loads(json.dumps(raw)))
        assert check.is_valid(raw), [e.message for e in check.iter_errors(raw)]
        load(raw)
    loads()


@pytest.mark.parametrize("kind", ["policy config", "engine config", "profile", "deployment"])
def test_what_a_published_schema_refuses_fails_naming_the_field(kind):
    """One value of a valid instance replaced by one the schema refuses (or a required
    key dropped): the loader refuses it too, with a one-line error naming that key."""
    import jsonschema
    from hypothesis import assume

    from schemas import from_schema, paths, replaced

    schema, repair, load = _schemas()[kind]
    check = jsonschema.Draft202012Validator(schema)

    @SCHEMA_FUZZ
    @given(from_schema(schema), st.data())
    def refused(raw, data):
        raw = repair(json.loads(json.dumps(raw)))
        path = data.draw(st.sampled_from(list(paths(raw))))
        bad = relinked(replaced(raw, path, data.draw(JSON)), path)
        assume(not check.is_valid(bad))
        with pytest.raises(StaircaseError) as err:
            load(bad)
        key = one_line([str(k) for k in path if isinstance(k, str)][-1])  # (a list's item: the list's key)
        assert "\n" not in str(err.value) and key in str(err.value), (path, str(err.value))
    refused()
