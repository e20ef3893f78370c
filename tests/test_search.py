"""The policy search: its space comes from the policies' knobs, bad input is named
before any work, the same seed gives the same results in one process, a process pool
and a local Ray cluster, and an interrupted search resumes without redoing or losing
finished evaluations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from staircase.live.engines import free_port
from staircase.search.objectives import Constraint
from staircase.search.report import pareto
from staircase.search.run import SearchConfig, make_scenarios, run_search
from staircase.search.space import SearchSpace, schedule_sizes
from staircase.workload import Workload
from staircase.errors import ConfigError
from staircase.policies import POLICY_KINDS, Knob, StaircasePolicy
from staircase.topology import moa

STAIRCASE = [sys.executable, "-m", "staircase"]


def small(tmp: Path, **kw) -> tuple[SearchConfig, Path]:
    topo = moa(3)
    scen = make_scenarios([None], topo, Workload("poisson", 40, 1.0, query_tokens=80, output_tokens=48), [0.4, 0.8],
                          max_tokens=48, seed=3)
    cfg = SearchConfig(SearchSpace(["staircase", "wait-all"], topo), scen, ["ttft_p90", "stall_p50", "e2e_p50"],
                       [Constraint.parse("context_p50>=8")], **({"method": "nsga", "budget": 24, "batch": 8} | kw))
    return cfg, tmp


def trial_values(study) -> list:
    return [(t.user_attrs.get("key"), tuple(round(v, 9) for v in (t.values or ()))) for t in study.trials]


def test_schedules_from_first_growth_and_cap():
    assert schedule_sizes(8, 16, 256) == (8, 128, 256)  # the paper's proposer schedule
    assert schedule_sizes(8, 16, 128) == (8, 128)  # = 8,128,128 (the last size repeats)
    assert schedule_sizes(4, 1, 512) == (4,) and schedule_sizes(64, 2, 16) == (64,)


def test_the_space_is_read_from_each_policy_kinds_knobs(monkeypatch):
    class Smooth(StaircasePolicy):  # a policy kind added later: the search needs no change
        KIND = "smooth-test"
        PARAMS = StaircasePolicy.PARAMS + ("smoothing",)
        KNOBS = StaircasePolicy.KNOBS + (Knob("smoothing", "float", 0.05, 0.95),)

        def __init__(self, smoothing: float = 0.5, **kw):
            self.smoothing = smoothing
            super().__init__(**kw)

    monkeypatch.setitem(POLICY_KINDS, "smooth-test", Smooth)
    space = SearchSpace(["smooth-test"], moa(3), ranges={"smooth-test.redundancy": (0, 5)})
    names = {d.name for d in space.spaces["smooth-test"].dims}
    assert "smooth-test.smoothing" in names and "smooth-test.proposer_schedule.first" in names
    red = next(d for d in space.spaces["smooth-test"].dims if d.name == "smooth-test.redundancy")
    assert red.high == 2  # capped below the fan-in of 3
    config = space.config_of({d.name: d.grid(2)[-1] for d in space.spaces["smooth-test"].dims})
    assert config.build().smoothing == 0.95


@pytest.mark.parametrize("make,field", [
    (lambda: SearchSpace(["nope"], moa(3)), "kinds"),
    (lambda: SearchSpace(["staircase"], moa(3), fix={"staircase.speed": "1"}), "space"),
    (lambda: SearchSpace(["staircase"], moa(3), ranges={"staircase.redundancy": (2, 1)}), "staircase.redundancy"),
    (lambda: SearchSpace(["staircase"], moa(3), ranges={"staircase.redundancy": (3, 4)}), "staircase.redundancy"),
    (lambda: SearchSpace(["staircase"], moa(3), fix={"staircase.layout": "zigzag"}), "layout"),
    (lambda: Constraint.parse("context_p50>=100000", 384), "constraint"),
    (lambda: Constraint.parse("ttft_p90<=-1"), "constraint"),
    (lambda: Constraint.parse("speed>=1"), "constraint"),
])
def test_bad_search_spaces_are_named(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.field == field


def test_cli_rejects_a_bad_space_in_one_line_before_any_work(tmp_path):
    out = tmp_path / "s"
    done = subprocess.run(STAIRCASE + ["search", "--range", "staircase.redundancy=2..1", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "staircase.redundancy" in done.stderr and not out.exists()
    done = subprocess.run(STAIRCASE + ["search", "--objectives", "ttft_p90,speed", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "objectives" in done.stderr and not out.exists()


def test_same_seed_same_results_in_one_process_and_a_pool(tmp_path):
    cfg, _ = small(tmp_path, workers=1)
    serial = run_search(cfg, tmp_path / "serial", progress=False)
    cfg, _ = small(tmp_path, workers=2)
    pool = run_search(cfg, tmp_path / "pool", progress=False)
    assert trial_values(serial) == trial_values(pool)
    assert len({k for k, _ in trial_values(serial)}) > 8  # the sampler explored


def test_resume_after_a_kill_redoes_and_loses_nothing(tmp_path):
    out = tmp_path / "s"
    args = STAIRCASE + ["search", "--requests", "60", "--budget", "400", "--batch", "4", "--workers", "1",
                        "--load", "0.5", "--no-figure", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = out / "evaluations.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not store.exists() or len(store.read_text().splitlines()) < 12):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = store.read_text().splitlines()
    assert len(before) >= 12
    done = subprocess.run(args[:-3] + ["--budget", "40", "--no-figure", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
    complete = [json.loads(line) for line in before if line.endswith("}")]
    keys = [(r["key"], r["scenario"]) for r in after]
    assert len(keys) == len(set(keys)), "an evaluation was redone"
    assert all(r in after for r in complete), "a finished evaluation was lost"
    best = json.loads((out / "best.json").read_text())
    assert best["evaluated"] >= len({r["key"] for r in complete}) and "commands" in best
    # the folder holds this search: other settings are refused, not mixed in
    other = subprocess.run(args[:-5] + ["--load", "0.9", "--out", str(out)], capture_output=True, text=True)
    assert other.returncode == 2 and "scenarios" in other.stderr, other.stderr


def test_a_local_ray_cluster_gives_the_same_results(tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip("ray is not installed (make test installs it)")
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")  # conftest keeps Ray on loopback
    started = subprocess.run([str(ray_bin), "start", "--head", "--num-cpus=2", f"--port={port}",
                              "--include-dashboard=false", "--disable-usage-stats",
                              "--node-ip-address=127.0.0.1"],  # the cluster's traffic stays on loopback
                             capture_output=True, text=True, env=env, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    assert "Local node IP: 127.0.0.1" in started.stdout + started.stderr  # not the machine's network address
    try:
        cfg, _ = small(tmp_path, ray=f"127.0.0.1:{port}")
        on_ray = run_search(cfg, tmp_path / "ray", progress=False)
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)
    cfg, _ = small(tmp_path, workers=1)
    serial = run_search(cfg, tmp_path / "serial", progress=False)
    assert trial_values(on_ray) == trial_values(serial)


def test_grid_budget_and_pareto(tmp_path, capsys):
    topo = moa(3)
    scen = make_scenarios([None], topo, Workload("poisson", 30, 0.2, query_tokens=80, output_tokens=32), None,
                          max_tokens=32, seed=0)
    fix = {"staircase.scope": "first", "staircase.layout": "prefix-cache", "staircase.redundancy": "1",
           "staircase.aggregator_schedule": "8"}
    space = SearchSpace(["staircase"], topo, fix=fix, ranges={"staircase.proposer_schedule": (4, 16)})
    grid = space.grid(2)
    with pytest.raises(ConfigError) as err:
        run_search(SearchConfig(space, scen, ["ttft_p50", "e2e_p50"], method="grid", budget=2, grid_points=2),
                   tmp_path / "g0")
    assert err.value.field == "budget"
    cfg = SearchConfig(space, scen, ["ttft_p50", "e2e_p50"], method="grid", budget=len(grid) + 5, workers=1,
                       grid_points=2)
    study = run_search(cfg, tmp_path / "g", progress=False)
    # the grid and the paper's staircase (wait-all is not searched); a larger budget is not filled at random
    assert len(study.trials) == len(grid) + 1
    assert "evaluating the grid alone" in capsys.readouterr().err
    df = pd.DataFrame({"scenario": "s", "feasible": [True, True, True, False], "ttft_p50": [1, 2, 3, 0.1],
                       "e2e_p50": [3, 2, 4, 0.1]})
    front = pareto(df, ["ttft_p50", "e2e_p50"])
    assert sorted(front["ttft_p50"]) == [1, 2]  # (3, 4) is dominated; the infeasible point does not count


def test_several_workloads_and_loads_make_one_scenario_each():
    topo = moa(3)
    w = [Workload("poisson", 20, 1.0, query_tokens=80, output_tokens=32),
         Workload("gamma", 20, 1.0, cv=3.0, query_tokens=80, output_tokens=32)]
    scen = make_scenarios([None], topo, w, [0.2, 0.6], max_tokens=32, seed=0)
    assert [s.name.split("/")[1] for s in scen] == ["poisson@0.2", "poisson@0.6", "gamma@0.2", "gamma@0.6"]
    assert len({s.key() for s in scen}) == 4
    rates = {s.name: s.workload["rate_per_s"] for s in scen}
    assert rates["cpu-smollm2-135m/poisson@0.6"] == pytest.approx(3 * rates["cpu-smollm2-135m/poisson@0.2"])
    done = subprocess.run(STAIRCASE + ["search", "--workload", "poisson,closed"], capture_output=True, text=True)
    assert done.returncode == 2 and "workload" in done.stderr


def test_a_quality_table_becomes_the_quality_metric_of_the_search(tmp_path):
    """``--quality-table``: measured quality against context, interpolated at each
    simulated run's context_p50, usable as an objective or a constraint."""
    from staircase.search.objectives import QualityCurve

    table = tmp_path / "quality_table.csv"
    pd.DataFrame({"policy": ["a", "b", "c", "a"], "metric": ["agreement", "agreement", "agreement", "retention:last"],
                  "context_tokens_p50": [16, 96, 400, 16], "mean": [0.5, 0.9, 0.95, 0.0]}).to_csv(table, index=False)
    curve = QualityCurve.from_table(str(table))
    assert curve.metric == "agreement" and curve(56) == pytest.approx(0.7)
    assert curve(1) == 0.5 and curve(10_000) == 0.95  # held flat beyond the measured ends
    assert QualityCurve.from_table(f"{table}:retention:last")(400) == 0.0
    with pytest.raises(ConfigError) as err:
        QualityCurve.from_table(f"{table}:exact_match")
    assert err.value.field == "quality-table metric" and "agreement" in err.value.allowed
    cfg, folder = small(tmp_path / "s", method="random", budget=6, batch=6, workers=1)
    cfg.constraints = [Constraint.parse("quality>=0.6")]
    with pytest.raises(ConfigError) as err:
        cfg.check()
    assert err.value.field == "quality-table"
    cfg.space = SearchSpace(["staircase"], moa(3), fix={"staircase.scope": "first", "staircase.layout": "standard",
                                                       "staircase.redundancy": "1", "staircase.aggregator_schedule": "8"},
                            ranges={"staircase.proposer_schedule": (4, 64)})
    cfg.quality = curve
    run_search(cfg, folder, progress=False)
    rows = [json.loads(line) for line in (folder / "evaluations.jsonl").read_text().splitlines()]
    contexts = sorted({r["metrics"]["context_tokens_p50"] for r in rows})
    assert len(contexts) > 1  # first chunks 4..64 read different contexts
    for r in rows:
        m = r["metrics"]
        assert m["quality_predicted"] == pytest.approx(curve(m["context_tokens_p50"]))
        assert cfg.constraints[0].violation(m) == pytest.approx(0.6 - m["quality_predicted"])
    with pytest.raises(ConfigError) as err:  # a resumed folder with another table is another search
        cfg.quality = QualityCurve.from_table(f"{table}:retention:last")
        run_search(cfg, folder, progress=False)
    assert err.value.field == "out" and "quality" in err.value.allowed
