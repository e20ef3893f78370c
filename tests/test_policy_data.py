"""Policies and topologies as data: a round trip describe() -> config -> policy, stable
hashes, declared knobs with ranges, and runs rebuilt from their recorded configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from staircase.errors import ConfigError
from staircase.policies import (POLICY_KINDS, DeadlineStaircasePolicy, StaircasePolicy, config_from_dict, config_of, make_policies,
                              policy_from_dict)
from staircase.topology import mad, moa, topology_from_config

DATA = Path(__file__).resolve().parents[1] / "calibration" / "data" / "cpu-smollm2"

ALL = make_policies(["wait-all", "single", "staircase", "staircase-deadline"], redundancies=[0, 1, 2],
                    proposer_schedule="16,64", aggregator_schedule="4,32", scope="every", max_wait_s=0.25)


@pytest.mark.parametrize("policy", ALL, ids=[p.name for p in ALL])
def test_every_policy_round_trips_through_its_config(policy):
    d = json.loads(json.dumps(policy.describe()))  # as a run's config.json holds it
    again = policy_from_dict(d)
    assert type(again) is type(policy) and again.describe() == policy.describe()
    assert again.config() == policy.config() and hash(again.config()) == hash(policy.config())
    assert config_from_dict(policy.config().to_dict()).build().name == policy.name


def test_config_keys_are_stable_and_tell_candidates_apart():
    a = StaircasePolicy(redundancy=1).config()
    assert a.key() == StaircasePolicy(redundancy=1).config().key() and len(a.key()) == 16
    assert len({p.config().key() for p in ALL}) == len(ALL)
    assert len({p.config() for p in ALL}) == len(ALL)  # hashable, distinct
    built = config_of("staircase", redundancy=2, proposer_schedule=[8, 64], layout="standard").build()
    assert built.redundancy == 2 and built.proposer_schedule.sizes == (8, 64) and built.name == "staircase-standard-r2"


def test_runs_recorded_before_configs_still_rebuild():
    cfg = json.loads((DATA / "live-alpaca-0-7-c1" / "config.json").read_text())
    rebuilt = [policy_from_dict(d) for d in cfg["policies"]]  # kinds recorded as class names
    cli = make_policies(["wait-all", "staircase"], redundancies=[1])
    assert [p.describe() for p in rebuilt] == [p.describe() for p in cli]


def test_bad_policy_configs_name_the_field():
    with pytest.raises(ConfigError, match="policy.kind: got 'magic'; allowed: staircase, staircase-deadline"):
        policy_from_dict({"kind": "magic"})
    with pytest.raises(ConfigError, match="policy.colour: got 'red'; allowed: parameters of staircase"):
        config_of("staircase", colour="red")
    with pytest.raises(ConfigError, match="redundancy: got -1"):
        policy_from_dict({"kind": "staircase", "redundancy": -1})


def test_every_policy_declares_its_knobs_with_ranges():
    for kind, cls in POLICY_KINDS.items():
        assert {k.name for k in cls.KNOBS} <= set(cls.PARAMS), kind
    knobs = {k.name: k for k in DeadlineStaircasePolicy.KNOBS}
    assert {"proposer_schedule", "aggregator_schedule", "redundancy", "scope", "layout", "max_wait_s"} == set(knobs)
    default = DeadlineStaircasePolicy()
    for name, knob in knobs.items():  # the defaults are inside the declared ranges
        value = getattr(default, name)
        knob.check(list(value.sizes) if hasattr(value, "sizes") else value)
    for name, bad in [("redundancy", 99), ("scope", "sideways"), ("proposer_schedule", [8, 0]), ("max_wait_s", -1.0),
                      ("redundancy", 1.5)]:
        with pytest.raises(ConfigError, match=f"^{name}: got"):
            knobs[name].check(bad)


@pytest.mark.parametrize("topology", [moa(3), moa(2, layers=2), mad(3, 2)], ids=["moa", "moa-2", "mad"])
def test_topologies_round_trip(topology):
    again = topology_from_config(json.loads(json.dumps(topology.config())))
    assert again == topology and again.config() == topology.config()
    with pytest.raises(ConfigError, match="topology_config.kind: got 'ring'"):
        topology_from_config({"kind": "ring"})


def test_validate_rebuilds_a_run_from_its_configs_not_its_cli_arguments(tmp_path):
    """The same committed run, once as recorded (CLI arguments) and once with only the
    topology and policy configs: the replay is the same."""
    from staircase.calibration.runs import load_live_run
    from staircase.calibration.replay import replay
    from staircase.record import topology_and_policies as run_topology_and_policies
    from staircase.sim.profile import load_profile

    shutil.copytree(DATA / "live-alpaca-0-7-c1", tmp_path / "run")
    cfg_path = tmp_path / "run" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["topology_config"] = moa(3).config()
    cfg["policies"] = [policy_from_dict(d).describe() for d in cfg["policies"]]
    del cfg["cli_args"]
    cfg_path.write_text(json.dumps(cfg))
    old, new = load_live_run(DATA / "live-alpaca-0-7-c1"), load_live_run(tmp_path / "run")
    t_old, p_old = run_topology_and_policies(old.config)
    t_new, p_new = run_topology_and_policies(new.config)
    assert t_old == t_new and [p.describe() for p in p_old] == [p.describe() for p in p_new]
    a, b = replay(old, load_profile(), replicates=1), replay(new, load_profile(), replicates=1)
    for name in a:
        assert a[name]["ttft_s"].tolist() == b[name]["ttft_s"].tolist()


def test_the_slot_rule_lives_in_the_topology():
    from staircase.sim.profile import load_profile
    from staircase.topology import proposer_slot_index, slot_target

    assert [slot_target(f"proposer-{i}", ["a", "b"], "agg") for i in range(5)] == ["a", "b", "a", "b", "a"]
    assert slot_target("aggregator", ["a"], "agg") == "agg" and proposer_slot_index("proposer-12") == 12
    with pytest.raises(ConfigError, match="slot: got 'judge-1'; allowed: aggregator or proposer-<i>"):
        slot_target("judge-1", ["a"], "agg")
    gpu = load_profile("illustrative-gpu")  # three proposer sizes: proposer-3 runs on proposer-0's model
    assert gpu.engine_for_slot("proposer-3")[0] == f"proposer-3:{gpu.proposer_engines[0]}"
