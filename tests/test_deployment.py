"""Deployments as data and the routers (``staircase.deployment``): the checks name the
field, the two engine-sharing modes are deployments, and each router keeps its promise
under random pool states (hypothesis)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from staircase.deployment import (ROUTERS, Affinity, Deployment, LeastKV, LeastLoaded, PowerOfTwo, RoundRobin,
                                  deployment_from_dict, json_schema, load_deployment)
from staircase.errors import ConfigError

GOOD = {"pools": {"small": {"model": "p", "replicas": 3, "router": "round-robin"},
                  "big": {"model": "a", "replicas": 2, "router": "affinity"}},
        "slots": {"proposers": ["small"], "aggregator": "big"}}


@dataclass
class Replica:
    in_flight: int = 0
    kv_tokens: int = 0


def test_a_deployment_maps_slots_to_pools_and_round_trips(tmp_path):
    d = deployment_from_dict(GOOD, models=["p", "a"])
    assert d.pool_for_slot("proposer-2").name == "small" and d.pool_for_slot("aggregator").name == "big"
    assert d.engines == 5
    path = tmp_path / "d.json"
    path.write_text(json.dumps(d.to_dict()))
    assert load_deployment(path) == d


def test_yaml_files_load_too(tmp_path):
    import yaml  # (a dependency of the package: YAML deployment files)
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert load_deployment(path).pools["small"].replicas == 3


@pytest.mark.parametrize("change, field", [
    (lambda r: r.pop("pools"), "deployment.pools"),
    (lambda r: r["pools"]["small"].update(replicas=0), "deployment.pools.small.replicas"),
    (lambda r: r["pools"]["small"].update(replicas=True), "deployment.pools.small.replicas"),
    (lambda r: r["pools"]["small"].update(router="random"), "deployment.pools.small.router"),
    (lambda r: r["pools"]["small"].update(model="x"), "deployment.pools.small.model"),
    (lambda r: r["pools"]["small"].update(colour="red"), "deployment.pools.small.colour"),
    (lambda r: r["slots"].update(proposers=["nope"]), "deployment.slots.proposers"),
    (lambda r: r["slots"].update(aggregator="nope"), "deployment.slots.aggregator"),
    (lambda r: r.update(schema="other/9"), "deployment.schema"),
    (lambda r: r.update(extra=1), "deployment.extra"),
])
def test_bad_deployments_name_the_field(change, field):
    raw = json.loads(json.dumps(GOOD))
    change(raw)
    with pytest.raises(ConfigError) as err:
        deployment_from_dict(raw, models=["p", "a"])
    assert err.value.field == field


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="an existing JSON or YAML file"):
        load_deployment(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="valid JSON"):
        load_deployment(tmp_path / "bad.json")


def test_the_engine_sharing_modes_are_deployments():
    one = Deployment.one("a")
    assert one.engines == 1 and {one.pool_for_slot(s).name for s in ("proposer-0", "proposer-5", "aggregator")} == {"shared"}
    per = Deployment.per_slot(["p1", "p2"], "a", proposers=3)
    assert per.engines == 4
    assert [per.pool_for_slot(f"proposer-{i}").model for i in range(3)] == ["p1", "p2", "p1"]
    assert per.pool_for_slot("aggregator").model == "a"


def test_the_schema_lists_every_router():
    schema = json_schema()
    pool = schema["properties"]["pools"]["additionalProperties"]
    assert pool["properties"]["router"]["enum"] == list(ROUTERS) and pool["additionalProperties"] is False


def test_round_robin_cycles_and_affinity_sticks_until_released():
    rr, reps = RoundRobin(), [Replica(), Replica(), Replica()]
    assert [rr.pick(reps, i, "n") for i in range(5)] == [0, 1, 2, 0, 1]
    aff = Affinity()
    reps[0].in_flight = 5
    first = aff.pick(reps, 7, "aggregator")
    reps[first].in_flight = 9  # busier now: the request's next step still goes there
    assert first == 1 and aff.pick(reps, 7, "aggregator") == 1
    assert aff.pick(reps, 7, "proposer-0") == 2  # another node of the request places on its own
    aff.release(7)
    assert aff.pick(reps, 7, "aggregator") == 2


loads = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 10_000)), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(loads, st.integers(0, 3), st.integers(0, 2**16))
def test_every_router_picks_a_replica_and_keeps_its_promise(pool, request_id, seed):
    reps = [Replica(a, b) for a, b in pool]
    for name, cls in ROUTERS.items():
        i = cls(seed).pick(reps, request_id, "aggregator")
        assert 0 <= i < len(reps), name
    least = min(r.in_flight for r in reps)
    assert reps[LeastLoaded().pick(reps, 0, "n")].in_flight == least
    assert reps[LeastKV().pick(reps, 0, "n")].kv_tokens == min(r.kv_tokens for r in reps)
    p2c = PowerOfTwo(seed).pick(reps, 0, "n")
    if len(reps) > 1:  # of two distinct draws the less loaded: never the single busiest replica
        busiest = max(range(len(reps)), key=lambda j: (reps[j].in_flight, j))
        assert p2c != busiest or sum(r.in_flight == reps[busiest].in_flight for r in reps) > 1


def test_power_of_two_is_seeded():
    reps = [Replica(i % 3) for i in range(6)]
    assert [PowerOfTwo(5).pick(reps, 0, "n") for _ in range(3)] == [PowerOfTwo(5).pick(reps, 0, "n") for _ in range(3)]
    a, b = PowerOfTwo(5), PowerOfTwo(5)
    assert [a.pick(reps, k, "n") for k in range(20)] == [b.pick(reps, k, "n") for k in range(20)]


# ------------------------------------------------------------------ in the simulator

def _sim(deployment=None, profile="illustrative-gpu", rate=0.4, policy=None, requests=60, proposers=3):
    from staircase.sim.profile import load_profile
    from staircase.sim.simulate import simulate
    from staircase.workload import Workload
    from staircase.policies import StaircasePolicy
    from staircase.topology import moa

    return simulate(moa(proposers), policy or StaircasePolicy(redundancy=1), Workload("poisson", requests, rate,
                    output_tokens=128), load_profile(profile), seed=3, max_tokens=128, deployment=deployment)


TIMES = ["ttft_s", "e2e_s", "prompt_tokens", "cached_tokens"]


def test_the_sharing_modes_as_deployments_simulate_as_today():
    from staircase.sim.profile import load_profile

    gpu = load_profile("illustrative-gpu")  # per-slot
    per = Deployment.per_slot(gpu.proposer_engines, gpu.aggregator_engine, proposers=3)
    assert _sim(per).requests[TIMES].equals(_sim().requests[TIMES])
    cpu = load_profile("default")  # one engine for every slot
    one = Deployment.one(cpu.aggregator_engine)
    assert _sim(one, "default", rate=0.1).requests[TIMES].equals(_sim(None, "default", rate=0.1).requests[TIMES])


def _pooled(router: str, replicas: int = 2) -> Deployment:
    return deployment_from_dict({"pools": {"p": {"model": "small-8b", "replicas": replicas, "router": router},
                                           "a": {"model": "large-70b-local", "replicas": replicas, "router": router}},
                                 "slots": {"proposers": ["p"], "aggregator": "a"}})


def test_every_call_goes_through_its_pools_router():
    chunks = _sim(_pooled("round-robin")).chunks
    calls = chunks.drop_duplicates(["request_id", "node", "call"])
    assert set(calls["engine"]) == {"p/0", "p/1", "a/0", "a/1"}
    proposer_calls = calls[calls["role"] == "proposer"]["engine"].value_counts()
    assert abs(proposer_calls["p/0"] - proposer_calls["p/1"]) <= 1  # in turn
    # affinity: every step of one node of a request on one replica (the prefix cache's), both replicas used
    calls = _sim(_pooled("affinity")).chunks.drop_duplicates(["request_id", "node", "call"])
    assert calls.groupby(["request_id", "node"])["engine"].nunique().max() == 1
    assert calls.loc[calls["role"] == "aggregator", "engine"].nunique() == 2


def test_pool_figures_and_affinity_keeps_the_aggregators_prefix_cache():
    """Per-pool figures from the simulated engines' accounts: utilisation within (0, 1],
    queue waits >= 0, KV held; and the figure routers are compared by: behind affinity
    the aggregator's later steps find their earlier steps' prompt cached, behind
    round-robin they land on the other replica half the time."""
    from staircase.report import pool_frame

    frames = {}
    for router in ("round-robin", "affinity"):
        dep = _pooled(router)
        frames[router] = pool_frame({router: _sim(dep, rate=1.0)}, dep.engine_pools()).set_index("pool")
    for f in frames.values():
        assert ((f["utilisation_mean"] > 0) & (f["utilisation_max"] <= 1 + 1e-9)).all()
        assert (f["queue_wait_mean_s"] >= 0).all() and (f["kv_tokens_peak"] > 0).all()
        assert (f["kv_tokens_mean"] <= f["kv_tokens_peak"]).all()
        assert f.loc["a", "final_steps"] > f.loc["a", "calls"] * 0.99 and f.loc["p", "final_steps"] == 0
    cached = {r: f.loc["a", "cached_tokens_per_final_step"] for r, f in frames.items()}
    assert cached["affinity"] > 1.3 * cached["round-robin"], cached


def test_more_replicas_serve_a_load_one_engine_cannot():
    from staircase.policies import WaitAllPolicy

    one = _sim(_pooled("least-loaded", 1), rate=8.0, policy=WaitAllPolicy(), requests=150).requests
    four = _sim(_pooled("least-loaded", 4), rate=8.0, policy=WaitAllPolicy(), requests=150).requests
    assert four["ttft_s"].median() < 0.5 * one["ttft_s"].median()


def test_a_pool_of_a_model_the_profile_lacks_is_refused():
    bad = deployment_from_dict({"pools": {"x": {"model": "gpt-9"}}, "slots": {"proposers": ["x"], "aggregator": "x"}})
    with pytest.raises(ConfigError) as err:
        _sim(bad)
    assert err.value.field == "deployment.model"


def test_staircase_sim_takes_a_deployment_file(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "d.json"
    path.write_text(json.dumps(_pooled("power-of-two").to_dict()))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "staircase", "sim", "--profile", "illustrative-gpu", "--deployment",
                           str(path), "--requests", "30", "--format", "json", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["deployment"]["pools"]["p"]["router"] == "power-of-two"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pools": {"p": {"model": "gpt-9"}}, "slots": {"proposers": ["p"], "aggregator": "p"}}))
    done = subprocess.run([sys.executable, "-m", "staircase", "sim", "--profile", "illustrative-gpu", "--deployment",
                           str(bad)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "deployment.pools.p.model" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- live: the same routers on real engine objects
LIVE = {"pools": {"p": {"model": "prop", "replicas": 2, "router": "round-robin"},
                  "a": {"model": "agg", "replicas": 2, "router": "affinity"}},
        "slots": {"proposers": ["p"], "aggregator": "a"}}


def _replay_pools(deployment: Deployment) -> dict:
    from staircase.live.engines import ReplayEngine

    answer = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen " * 3
    return {p.name: [ReplayEngine(lambda _q: answer, name=f"{p.name}/{i}", tokens_per_s=400, first_token_s=0.01)
                     for i in range(p.replicas)] for p in deployment.pools.values()}


def test_the_live_runner_routes_every_call_through_its_pools_router(loop):
    """Replay engines (fast, no model) behind the core routers: proposers in turn across two
    replicas, every step of the aggregator's node of a request on one replica (affinity);
    after the run no replica holds calls or KV tokens."""
    from staircase.live.runner import LiveRunner
    from staircase.policies import StaircasePolicy
    from staircase.topology import moa

    dep = deployment_from_dict(LIVE)
    pools = _replay_pools(dep)
    topo = moa(2)
    slots = {n.slot: pools[dep.pool_for_slot(n.slot).name][0] for n in topo.nodes}
    runner = LiveRunner(slots, topo, max_tokens=24, deployment=dep, pools=pools)
    trace = loop.run_until_complete(runner.run_policy(StaircasePolicy(redundancy=0), [f"q{i}" for i in range(6)],
                                                      concurrency=2))
    assert (trace.requests["outcome"] == "ok").all()
    calls = trace.chunks.drop_duplicates(["request_id", "node", "call"])
    proposer = calls[calls["role"] == "proposer"]["engine"].value_counts()
    assert set(proposer.index) == {"p/0", "p/1"} and proposer["p/0"] == proposer["p/1"]
    final = calls[calls["role"] == "aggregator"]
    assert final.groupby("request_id").size().min() >= 2  # several steps per request...
    assert final.groupby("request_id")["engine"].nunique().max() == 1  # ...on one replica
    assert set(final["engine"]) == {"a/0", "a/1"}
    assert all(r.in_flight == 0 and r.kv_tokens == 0 for r in runner.replicas.values())
    assert runner.engine_pools() == {"p/0": "p", "p/1": "p", "a/0": "a", "a/1": "a"}


def test_live_engines_build_a_deployments_replicas_and_name_bad_fields(tmp_path):
    from staircase.live.engines import ServeEngine, cores_for, engines_from_config
    from staircase.topology import moa

    raw = {"engines": {"prop": {"kind": "serve", "model": "smollm2"}, "agg": {"kind": "serve", "model": "smollm2",
                                                                              "threads": ["0", "0"]}}}
    dep = deployment_from_dict(LIVE)
    engines = engines_from_config(raw, moa(3), deployment=dep)
    assert [e.name for e in engines.pools["p"]] == ["p/0", "p/1"] and len(engines.used) == 4
    assert all(isinstance(e, ServeEngine) for e in engines.used)
    # proposer replicas split the cores (the aggregator's give their own), the aggregator's as listed
    assert [e.server.threads for e in engines.pools["p"]] == cores_for(2)
    assert [e.server.threads for e in engines.pools["a"]] == ["0", "0"]
    assert engines.slots["proposer-2"] is engines.pools["p"][0]
    with pytest.raises(ConfigError) as err:
        engines_from_config(raw, moa(3), deployment=deployment_from_dict(
            {"pools": {"x": {"model": "nope"}}, "slots": {"proposers": ["x"], "aggregator": "x"}}))
    assert err.value.field == "deployment.pools.x.model"
    raw["engines"]["agg"]["threads"] = ["0"]
    with pytest.raises(ConfigError) as err:
        engines_from_config(raw, moa(3), deployment=dep)
    assert err.value.field == "config.engines.agg.threads"


def test_cores_split_evenly_or_not_at_all():
    import os

    from staircase.live.engines import cores_for

    n = len(os.sched_getaffinity(0))
    assert cores_for(1) == [None] and cores_for(n + 1) == [None] * (n + 1)
    if n >= 2:
        parts = cores_for(2)
        assert len(set(parts)) == 2 and all(p for p in parts)


def test_staircase_live_takes_a_deployment_file(tmp_path):
    """The CLI end to end on replay engines: the deployment recorded, a pools table written."""
    import subprocess
    import sys

    answers = tmp_path / "answers.jsonl"
    from staircase.live.prompts import load_prompts

    answers.write_text("".join(json.dumps({"query": q, "answer": "alpha beta gamma delta " * 8}) + "\n"
                               for q in load_prompts("mt_bench", 3)))
    spec = {"kind": "replay", "answers": str(answers), "tokens_per_s": 300, "first_token_s": 0.01}
    (tmp_path / "engines.json").write_text(json.dumps({"engines": {"prop": spec, "agg": spec},
                                                       "slots": {"proposers": ["prop"], "aggregator": "agg"}}))
    (tmp_path / "dep.json").write_text(json.dumps(LIVE))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "staircase", "live", "--config", str(tmp_path / "engines.json"),
                           "--deployment", str(tmp_path / "dep.json"), "--requests", "3", "--max-tokens", "16",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pools:" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["deployment"]["pools"]["a"]["router"] == "affinity"
    assert config["engine_pools"]["p/1"] == "p"
    import pandas as pd

    pools = pd.read_csv(out / "pools.csv")
    assert set(pools["pool"]) == {"p", "a"} and pools["calls"].sum() > 0
    # validate replays the run on the same deployment: the simulated calls on the same replicas
    from staircase.calibration.speed import at_speed, decode_speed
    from staircase.calibration.runs import load_live_run
    from staircase.calibration.replay import replay
    from staircase.sim.profile import load_profile, parse_profile

    base = load_profile("default").raw
    engine = next(iter(base["engines"].values()))
    profile = parse_profile(base | {"engines": {"prop": engine, "agg": engine},
                                    "slots": {"proposers": ["prop"], "aggregator": "agg"}})
    run = load_live_run(out)
    sim = replay(run, profile, replicates=1, with_chunks=True)
    for name, (_, chunks) in sim.items():
        assert set(chunks["engine"]) == set(run.chunks[name]["engine"]) >= {"p/0", "p/1", "a/0"}, name
    speed = decode_speed(run, profile)  # every replica observed against its pool's model
    assert speed is not None and speed["intervals"] > 0
    slower = at_speed(profile, {"decode_time_ratio": 2.0, "prefill_time_ratio": float("nan")})
    assert slower.engines["agg"].decode_base_s == 2 * profile.engines["agg"].decode_base_s
    assert slower.engines["agg"].prefill_per_token_s == profile.engines["agg"].prefill_per_token_s


def test_the_router_comparison_script_writes_its_table_and_figure(tmp_path):
    import subprocess
    import sys

    import pandas as pd

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_routers.py")
    done = subprocess.run([sys.executable, script, "--requests", "40", "--loads", "0.5",
                           "--routers", "round-robin,affinity", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    df = pd.read_csv(tmp_path / "routers.csv")
    assert len(df) == 4 and set(df["router"]) == {"round-robin", "affinity"}
    assert (df["ttft_p90_s"] > 0).all() and (tmp_path / "routers.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, script, "--routers", "random"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--routers: got 'random'" in bad.stderr


def test_calibrate_fits_one_model_over_a_pools_replicas(tmp_path):
    """The committed probe run of a two-replica pool (calibration/data/cpu-avx2-pool-apart/calibrate, both
    replicas probed): one profile model over both replicas' observations, slots from the deployment, and the
    same deployment file simulates with it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "calibration" / "data" / "cpu-avx2-pool-apart"
    done = subprocess.run([sys.executable, "-m", "staircase", "calibrate", "--traces", str(root / "calibrate"),
                           "--out", str(tmp_path / "cal"), "--no-figure"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    profile = json.loads((tmp_path / "cal" / "profile.json").read_text())
    assert list(profile["engines"]) == ["cpu"] and profile["slots"] == {"proposers": ["cpu"], "aggregator": "cpu"}
    sources = profile["calibration"]["cpu"]["data"]["sources"]
    assert any("cpu-0" in s for s in sources) and any("cpu-1" in s for s in sources)  # both replicas' probes
    run = subprocess.run([sys.executable, "-m", "staircase", "sim", "--profile", str(tmp_path / "cal" / "profile.json"),
                          "--deployment", str(root / "two-least-loaded.json"), "--requests", "10", "--no-figure",
                          "--out", str(tmp_path / "sim")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    from staircase.trace import read_chunks

    engines = set().union(*(set(read_chunks(f)["engine"]) for f in (tmp_path / "sim" / "traces").glob("*.chunks.parquet")))
    assert engines == {"cpu/0", "cpu/1"}  # the fitted model on both replicas of the pool
