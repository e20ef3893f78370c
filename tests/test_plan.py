"""Capacity planning (`staircase plan`) and the bursts `--load` reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from staircase.deployment import deployment_from_dict
from staircase.errors import ConfigError
from staircase.search.objectives import SLO
from staircase.plan.run import lockstep, rate_search, size_search
from staircase.sim.capacity import busiest

STAIRCASE = [sys.executable, "-m", "staircase"]


# ------------------------------------------------------------------------- SLOs
def test_an_slo_reads_as_a_percentile_or_as_a_share():
    assert SLO.parse("ttft_p90<=2") == SLO.parse("ttft<=2@90%") == SLO.parse("ttft <= 2 @ 0.9")
    assert SLO.parse("e2e_p50<=60") == SLO("e2e", 60.0, 0.5)
    assert SLO.parse(str(SLO.parse("stall<=1@99.5%"))) == SLO("stall", 1.0, 0.995)


@pytest.mark.parametrize("text, named", [("ttft_p90<2", "ttft_p90<2"), ("lag_p90<=2", "lag"),
                                         ("ttft_p90<=0", "ttft_p90<=0"), ("ttft<=2@150%", "ttft<=2@150%")])
def test_a_bad_slo_is_an_error_naming_it(text, named):
    with pytest.raises(ConfigError) as err:
        SLO.parse(text)
    assert err.value.field == "slo" and named in str(err.value)


def test_attainment_counts_failed_requests_as_misses():
    import pandas as pd

    requests = pd.DataFrame({"ttft_s": [0.5, 1.5, 3.0, np.nan], "outcome": ["ok", "ok", "ok", "error"]})
    assert SLO.parse("ttft<=2@50%").attainment(requests) == 0.5
    assert SLO.parse("ttft<=2@50%").violation({"attainment:ttft_p50<=2": 0.5}) == 0


# --------------------------------------------------------------- the searches
def drive(gen, met):
    """Run a search generator against an oracle; returns (result, points asked)."""
    asked, point = [], next(gen)
    while True:
        asked.append(point)
        try:
            point = gen.send(met(point))
        except StopIteration as stop:
            return stop.value, asked


UNIT = deployment_from_dict({"pools": {"p": {"model": "a", "replicas": 2}, "agg": {"model": "b"}},
                             "slots": {"proposers": ["p"], "aggregator": "agg"}})


@settings(max_examples=60, deadline=None)
@given(need_p=st.integers(1, 40), need_agg=st.integers(1, 20), start=st.integers(1, 30))
def test_sizing_finds_the_fewest_replicas_per_pool_for_any_monotone_need(need_p, need_agg, start):
    met = lambda c: c["p"] >= need_p and c["agg"] >= need_agg  # noqa: E731
    counts, asked = drive(size_search(UNIT, start, 200, ["agg", "p"]), met)
    assert counts == {"p": need_p, "agg": need_agg}
    assert len(asked) <= 2 * 6 + 3 * 2 * 6  # galloping and bisecting units, then each pool (passes)


@settings(max_examples=60, deadline=None)
@given(need=st.integers(2, 60), weight=st.integers(1, 4), start=st.integers(1, 30))
def test_sizing_ends_where_no_pool_can_give_up_a_replica(need, weight, start):
    met = lambda c: c["p"] + weight * c["agg"] >= need  # noqa: E731  pools that stand in for each other
    counts, _ = drive(size_search(UNIT, start, 400, ["agg", "p"]), met)
    assert met(counts)
    for pool in counts:
        assert counts[pool] == 1 or not met(counts | {pool: counts[pool] - 1})


def test_sizing_gives_up_past_the_largest_deployment():
    counts, asked = drive(size_search(UNIT, 1, 30, ["p", "agg"]), lambda c: c["p"] >= 100)
    assert counts is None and max(sum(c.values()) for c in asked) <= 30


@pytest.mark.parametrize("limit", [0.3, 1.0, 1.7, 9.0])
def test_the_rate_search_finds_the_highest_rate_met(limit):
    found, _ = drive(rate_search(), lambda f: f <= limit)
    assert found <= limit < found * 2 ** (1 / 8)


def test_lockstep_runs_every_job_to_its_end_in_batches():
    batches = []

    def judge(pending):
        batches.append(dict(pending))
        return {job: point <= 2.5 for job, point in pending.items()}

    out = lockstep({"a": rate_search(), "b": rate_search(steps=2)}, judge)
    assert out["a"] <= 2.5 and out["b"] <= 2.5 and len(batches[0]) == 2


# ------------------------------------------------------------------------ bursts
def test_the_busiest_window_finds_a_burst_the_average_hides():
    steady = np.arange(0, 1200, 1.0)  # 1/s for 20 minutes
    burst = 600 + np.linspace(0, 60, 300, endpoint=False)  # 300 more in one minute
    b = busiest(np.concatenate([steady, burst]), window_s=60)
    assert b["average_per_s"] == pytest.approx(1500 / 1199, rel=0.01)
    assert b["busiest_per_s"] == pytest.approx(6.0, rel=0.05) and 540 <= b["start_s"] <= 600


def test_sim_load_reports_the_busiest_window(tmp_path):
    out = subprocess.run(STAIRCASE + ["sim", "--profile", "illustrative-gpu", "--workload", "gamma", "--cv", "8",
                                      "--requests", "3000", "--load", "0.7", "--policies", "wait-all", "--no-figure",
                                      "--summary-only", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    load = json.loads((tmp_path / "r" / "config.json").read_text())["load"]
    assert load["load"] == 0.7 and load["busiest_load"] > load["average_load"]
    assert f"the busiest {load['busiest_window_s']:.0f} s {load['busiest_load']:.2f}" in out.stderr
    if load["busiest_load"] > 1:
        assert "warning: bursts" in out.stderr


# ----------------------------------------------------------------------- plans
SMALL = ["--profile", "illustrative-gpu", "--proposers", "3", "--requests", "300", "--rate", "12",
         "--max-tokens", "128", "--slo", "ttft_p90<=8", "--slo", "e2e_p50<=20", "--no-figure",
         "--policies", "wait-all,staircase-prefix-cache", "--redundancy", "1",
         "--cost", "large-70b-local=8", "--cost", "small-8b=2", "--cost", "medium-32b=4", "--cost", "large-70b=8"]


def plan(tmp_path: Path, *extra: str, name: str = "plan") -> dict:
    out = subprocess.run(STAIRCASE + ["plan", *SMALL, *extra, "--out", str(tmp_path / name), "--format", "json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_plan_finds_each_policys_cheapest_deployment_and_it_replays_in_sim(tmp_path):
    result = plan(tmp_path, "--workers", "1")
    rows = __import__("pandas").read_csv(tmp_path / "plan" / "frontier.csv")
    for name, w in result["policies"].items():
        if not w["met"]:
            continue
        sized = rows[(rows["policy"] == name) & (rows["search"] == "size")]
        # the pick met every SLO; every deployment of its job with fewer engines tried missed one
        assert sized[sized["engines"] == w["engines"]]["met"].any()
        job = sized[sized["router"] == w["router"]]
        assert not job[job["cost_per_hour"] < w["cost_per_hour"]]["met"].any()
        # one replica fewer in any pool (that has more than one) was tried and missed
        picked = {p: d["replicas"] for p, d in w["deployment"]["pools"].items()}
        tried = {r: m for r, m in zip(job["replicas"], job["met"])}
        for pool, n in picked.items():
            if n > 1:
                fewer = ",".join(f"{p}={k - (p == pool)}" for p, k in picked.items())
                assert tried.get(fewer) is False or tried.get(fewer) == False, (pool, fewer)  # noqa: E712
        cmd = result["commands"][name]["sim"].split(" ", 2)[2]
        sim = subprocess.run(STAIRCASE + ["sim", *__import__("shlex").split(cmd), "--out", str(tmp_path / name),
                                          "--no-figure"], capture_output=True, text=True, timeout=300)
        assert sim.returncode == 0, sim.stderr
    assert all(w["met"] for w in result["policies"].values())
    assert result["policies"][result["cheapest"]]["goodput_per_s"] >= result["offered_per_s"] * 0.9


def test_a_plan_is_the_same_on_one_process_and_on_two(tmp_path):
    one = plan(tmp_path, "--workers", "1", "--no-goodput", name="one")
    two = plan(tmp_path, "--workers", "2", "--no-goodput", name="two")
    pick = lambda r: {n: (w.get("deployment"), w.get("config")) for n, w in r["policies"].items()}  # noqa: E731
    assert pick(one) == pick(two)


def test_an_slo_no_policy_meets_even_idle_fails_before_any_work(tmp_path):
    out = subprocess.run(STAIRCASE + ["plan", "--slo", "ttft_p90<=0.001", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "slo" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, field", [(["--cost", "gpu=2"], "cost"), (["--cost", "local"], "cost"),
                                         (["--routers", "random"], "routers"), (["--slo", "ttft<2"], "slo"),
                                         (["--max-engines", "0"], "max-engines"), (["--tune", "-1"], "tune")])
def test_bad_plan_options_are_one_line_errors(tmp_path, args, field):
    out = subprocess.run(STAIRCASE + ["plan", *args, "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and field in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists()


def test_a_plan_on_a_local_ray_cluster_gives_the_same_answer(tmp_path):
    import os

    from staircase.live.engines import free_port

    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip("ray is not installed (make test installs it)")
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    started = subprocess.run([str(ray_bin), "start", "--head", "--num-cpus=2", f"--port={port}",
                              "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        on_ray = plan(tmp_path, "--ray", f"127.0.0.1:{port}", name="ray")
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)
    serial = plan(tmp_path, "--workers", "1", name="serial")
    pick = lambda r: {n: (w.get("deployment"), w.get("config"), w.get("goodput_per_s"))  # noqa: E731
                      for n, w in r["policies"].items()}
    assert pick(on_ray) == pick(serial)


def test_tuning_searches_each_policy_kinds_knobs_first_and_sizes_with_the_best(tmp_path):
    result = plan(tmp_path, "--workers", "1", "--no-goodput", "--tune", "6", name="tuned")
    folder = tmp_path / "tuned"
    for name in ("wait-all", "staircase-prefix-cache-r1"):
        lines = (folder / "tune" / name / "evaluations.jsonl").read_text().splitlines()
        assert 1 <= len(lines) <= 6  # the kind's search ran at the starting size (repeats are not rerun)
        assert (folder / "tune" / name / "study.journal").is_file()
    untuned = plan(tmp_path, "--workers", "1", "--no-goodput", name="untuned")
    for name, w in result["policies"].items():  # more candidates per size: never a dearer pick
        assert w["cost_per_hour"] <= untuned["policies"][name]["cost_per_hour"]


@pytest.mark.parametrize("proposers", [1, 2, 3, 5, 6])
def test_the_default_unit_runs_every_slot_on_the_profiles_model_for_it(proposers):
    from staircase.plan.run import unit_deployment
    from staircase.sim.profile import load_profile
    from staircase.topology import moa

    profile, topo = load_profile("illustrative-gpu"), moa(proposers)
    unit = unit_deployment(profile, topo)
    for node in topo.nodes:
        assert unit.pool_for_slot(node.slot).model == profile.engine_for_slot(node.slot)[1].name
    assert unit.engines == proposers + 1  # one engine per slot, as the profile's per-slot sharing


def test_a_plan_under_faults_counts_failed_requests_as_misses(tmp_path):
    flaky = plan(tmp_path, "--workers", "1", "--no-goodput", "--faults", "proposers=0.06", name="flaky")
    w, r1 = flaky["policies"]["wait-all"], flaky["policies"]["staircase-prefix-cache-r1"]
    # wait-all loses a request to any proposer's fault (about 17 % of requests): 90 % within the TTFT bound is out
    # of reach at any size, and the idle check says so; r = 1 rides out one lost input and is sized
    assert not w["met"] and "idle" in w["why"] and r1["met"]
    inputs = json.loads((tmp_path / "flaky" / "plan.json").read_text())["inputs"]
    assert inputs["faults"] == {"proposers": 0.06} and "--faults=proposers=0.06" in flaky["commands"][
        "staircase-prefix-cache-r1"]["sim"]
