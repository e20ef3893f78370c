"""Faults at random in the simulator (`--faults 'proposers=0.05'`, sim/faults.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from staircase.deployment import deployment_from_dict
from staircase.errors import ConfigError
from staircase.policies import StaircasePolicy, WaitAllPolicy
from staircase.topology import moa
from staircase.sim.faults import RandomFaults, parse_fault_rates
from staircase.sim.profile import load_profile
from staircase.sim.simulate import simulate
from staircase.workload import Workload

W = Workload("poisson", requests=300, rate_per_s=1.0, query_tokens=100, output_tokens=64)


def run(policy, rates, **kw):
    return simulate(moa(3), policy, W, load_profile("illustrative-gpu"), seed=3, max_tokens=64, keep_chunks=False,
                    progress=False, fault_rates=rates, **kw)


def lost(trace) -> list[set[str]]:
    return [{p.split(":")[0] for p in row.split("; ") if p} for row in trace.requests["lost"]]


@pytest.mark.parametrize("text, field", [("proposers=2", "faults.proposers"), ("proposers", "faults"),
                                         ("=0.1", "faults.?"), ("proposers=nan", "faults.proposers")])
def test_bad_rates_are_errors_naming_the_field(text, field):
    with pytest.raises(ConfigError) as err:
        parse_fault_rates(text)
    assert err.value.field == field


def test_a_key_must_name_a_group_a_slot_or_a_pool():
    with pytest.raises(ConfigError) as err:
        run(WaitAllPolicy(), "judges=0.1")
    assert "proposers, aggregator, aggregator, proposer-0" in str(err.value)


def test_the_draws_fail_calls_at_the_stated_rate_at_a_uniform_token():
    rf = RandomFaults({"proposers": 0.2}, seed=7)
    draws = [rf.fail_token(rid, f"L0.p{i}", 0, 0.2, 100) for rid in range(5000) for i in range(3)]
    hits = [d for d in draws if d is not None]
    sd = math.sqrt(len(draws) * 0.2 * 0.8)
    assert abs(len(hits) - 0.2 * len(draws)) < 4 * sd
    assert min(hits) >= 0 and max(hits) < 100 and abs(sum(hits) / len(hits) - 49.5) < 3


def test_rate_zero_is_no_fault_and_the_same_calls_fail_in_every_policy():
    base = run(WaitAllPolicy(), None)
    assert run(WaitAllPolicy(), "proposers=0").requests.equals(base.requests)
    a, b = run(WaitAllPolicy(), "proposers=0.1"), run(StaircasePolicy(redundancy=1), "proposers=0.1")
    # common random numbers: the same calls fail (wait-all gives up at the first loss and cancels the rest)
    assert all(x <= y for x, y in zip(lost(a), lost(b))) and sum(map(bool, lost(a))) > 30
    assert a.meta["faults_injected"] == b.meta["faults_injected"] >= sum(map(len, lost(b)))


def test_redundancy_rides_out_proposer_faults_that_wait_all_fails_on():
    wait_all, r1 = run(WaitAllPolicy(), "proposers=0.1"), run(StaircasePolicy(redundancy=1), "proposers=0.1")
    assert (wait_all.requests["outcome"] != "ok").sum() == sum(map(bool, lost(wait_all)))
    failed = r1.requests["outcome"] != "ok"
    assert failed.sum() < (wait_all.requests["outcome"] != "ok").sum()
    assert all(len(s) >= 2 for s, f in zip(lost(r1), failed) if f)  # r = 1 fails only when two inputs are lost


def test_a_pool_rate_overrides_the_group_rate():
    d = deployment_from_dict({"pools": {"flaky": {"model": "small-8b", "replicas": 2},
                                        "steady": {"model": "medium-32b", "replicas": 2},
                                        "agg": {"model": "large-70b-local"}},
                              "slots": {"proposers": ["flaky", "steady", "steady"], "aggregator": "agg"}})
    t = run(WaitAllPolicy(), "proposers=0,flaky=0.3", deployment=d)
    nodes = set().union(*lost(t))
    assert nodes == {"L0.p0"}  # proposer-0 runs on the flaky pool, the others on the steady one


def test_sim_and_search_take_faults_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "staircase", "sim", "--profile", "illustrative-gpu", "--requests", "60",
                          "--rate", "1", "--faults", "proposers=0.2", "--policies", "wait-all", "--no-figure",
                          "--format", "json", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["policies"]["wait-all"]["errors"] > 0
    bad = subprocess.run([sys.executable, "-m", "staircase", "sim", "--faults", "proposers=1.5", "--out",
                          str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "faults.proposers" in bad.stderr and not (tmp_path / "b").exists()


def test_a_search_scenario_with_faults_weighs_redundancy():
    from staircase.search.run import evaluate, make_scenarios

    clean, = make_scenarios([None], moa(3), W, None, max_tokens=64, seed=3)
    flaky, = make_scenarios([None], moa(3), W, None, max_tokens=64, seed=3, faults={"proposers": 0.1})
    assert clean.key() != flaky.key()
    from dataclasses import asdict
    r0 = evaluate(StaircasePolicy(redundancy=0).config().to_dict(), asdict(flaky))
    r1 = evaluate(StaircasePolicy(redundancy=1).config().to_dict(), asdict(flaky))
    assert r1["errors"] < r0["errors"] and evaluate(StaircasePolicy(redundancy=0).config().to_dict(),
                                                    asdict(clean))["errors"] == 0
