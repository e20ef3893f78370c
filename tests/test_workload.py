"""One workload for every command: a run's traffic as a workload, and the live runner's
open loop sending at the simulator's arrival times."""

from __future__ import annotations

import pytest

from staircase.errors import ConfigError
from staircase.live.runner import LiveRunner
from staircase.sim.profile import load_profile
from staircase.sim.simulate import simulate
from staircase.policies import WaitAllPolicy
from staircase.topology import moa
from staircase.trace import read_requests
from staircase.workload import Workload, arrival_times, make_requests, read_arrivals


def test_the_live_open_loop_sends_at_the_simulators_arrival_times():
    sim = [r.arrival_s for r in make_requests(Workload("poisson", 40, 2.5), seed=7)]
    live = LiveRunner._arrivals(40, 2.5, 7, None)
    assert live == sim == arrival_times(Workload("poisson", 40, 2.5), 7)
    assert LiveRunner._arrivals(40, 2.5, 8, None) != sim  # the seed matters
    assert LiveRunner._arrivals(40, None, 7, None) is None  # no rate: a closed loop


def test_a_runs_traffic_is_a_workload_with_its_arrivals_and_lengths(tmp_path):
    topology = moa(3)
    base = Workload("gamma", 25, 1.5, cv=3.0, query_tokens=300, output_tokens=40)
    trace = simulate(topology, WaitAllPolicy(), base, load_profile(), seed=3, max_tokens=64)
    trace.write(tmp_path / "run" / "traces")
    recorded = read_requests(next((tmp_path / "run" / "traces").glob("*.requests.parquet"))).sort_values("arrival_s")
    again = make_requests(Workload("run", 25, trace=str(tmp_path / "run")), seed=0)
    assert [r.arrival_s for r in again] == pytest.approx(list(recorded["arrival_s"] - recorded["arrival_s"].min()))
    assert [r.query_tokens for r in again] == list(recorded["query_tokens"])
    assert [r.output_tokens for r in again] == [max(1, int(t)) for t in recorded["output_tokens"]]
    faster = make_requests(Workload("run", 25, trace=str(tmp_path / "run"), time_scale=2.0), seed=0)
    assert [r.arrival_s for r in faster] == pytest.approx([r.arrival_s / 2 for r in again])
    # a file of seconds: its times, the medians as lengths
    (tmp_path / "times.txt").write_text("5\n5.5\n7\n")
    from_file = make_requests(Workload("run", 3, query_tokens=90, output_tokens=12, trace=str(tmp_path / "times.txt")), 0)
    assert [(r.arrival_s, r.query_tokens, r.output_tokens) for r in from_file] == [(0, 90, 12), (0.5, 90, 12), (2, 90, 12)]
    assert read_arrivals(tmp_path / "times.txt") == [0.0, 0.5, 2.0]


def test_a_run_workload_without_its_run_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="trace"):
        Workload("run", 10)
    (tmp_path / "bad.txt").write_text("1\nsoon\n")
    with pytest.raises(ConfigError, match="arrivals.*one per line"):
        make_requests(Workload("run", 2, trace=str(tmp_path / "bad.txt")), 0)
