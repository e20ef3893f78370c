"""Calibration: fitting profiles from traces, replaying live runs, and bad input.

The fit is checked against traces the simulator made from a known profile (real
SimPy, no engine): the fit must find the profile's coefficients again. The live
calibration and validation on a real vLLM engine are in test_live.py; the committed
CPU runs are checked against the bundled profile at the end of this file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from staircase.calibration.fit import (CalibrationWarning, RunGroup, build_profile, fit_engine, fit_noise, load_runs,
                             observations)
from staircase.calibration.compare import PHASES, compare, compare_phases
from staircase.calibration.replay import replay
from staircase.calibration.runs import ValidationWarning, check_profile_model, load_live_run
from staircase.calibration.speed import decode_speed
from staircase.calibration.validate import validate
from staircase.sim.profile import load_profile, parse_profile
from staircase.sim.simulate import simulate
from staircase.workload import Workload
from staircase.cli import TOPOLOGY_POLICY_KEYS, topology_and_policies
from staircase.errors import ConfigError
from staircase.policies import SinglePolicy, make_policies
from staircase.topology import moa

REPO = Path(__file__).resolve().parents[1]
CPU_RUNS = REPO / "calibration" / "data" / "cpu-smollm2"

TRUTH = {"prefill_s": {"base": 0.02, "per_token": 4e-4, "per_token2": 1e-7},
         "decode_iteration_s": {"base": 0.03, "per_seq": 0.004, "per_context_token": 2e-6},
         "request_overhead_s": 0.01}


def truth_profile(noise_s: float = 0.05, model: str = "model-a") -> dict:
    nz = {"dist": "lognorm", "params": {"s": noise_s, "scale": 1.0}} if noise_s else None
    return {"schema": "staircase-profile/1", "name": "truth", "calibrated": True, "engine_sharing": "one",
            "engines": {"e": {**TRUTH, "model": model, "max_batch_size": 64, "kv_cache_tokens": 100_000,
                              "block_size_tokens": 32, "noise": {"prefill": nz, "decode": nz, "overhead": None}}},
            "slots": {"proposers": ["e"], "aggregator": "e"}}


def probe_groups(profile, levels=(1, 2, 4, 8), per_level=12, model="model-a", engine_name=None) -> list[RunGroup]:
    """Probe-like traces from the simulator: single calls, varied prompt lengths, several concurrency levels."""
    groups = []
    for c in levels:
        w = Workload("closed", requests=per_level * c, concurrency=c, query_tokens=300, output_tokens=60,
                     length_sigma=0.9)
        t = simulate(moa(1), SinglePolicy(), w, profile, seed=c, max_tokens=64, progress=False)
        chunks = t.chunks if engine_name is None else t.chunks.assign(engine=engine_name)
        name = str(chunks["engine"].iloc[0])
        groups.append(RunGroup(f"sim-c{c}", "single", chunks, t.requests, {"engine_models": {name: model}}))
    return groups


# ------------------------------------------------------------------------ fit


def test_fit_finds_the_profile_that_made_the_traces():
    prof = parse_profile(truth_profile())
    fit = fit_engine(observations(probe_groups(prof)))
    d, t = fit.decode, TRUTH["decode_iteration_s"]
    assert d["base"] == pytest.approx(t["base"], rel=0.05)
    assert d["per_seq"] == pytest.approx(t["per_seq"], rel=0.10)
    assert d["per_context_token"] == pytest.approx(t["per_context_token"], rel=0.25)
    # the first-token wait is overhead + prefill; their sum at zero tokens and the slopes are identified
    p, tp = fit.prefill, TRUTH["prefill_s"]
    assert fit.request_overhead_s + p["base"] == pytest.approx(tp["base"] + TRUTH["request_overhead_s"], rel=0.15)
    assert p["per_token"] == pytest.approx(tp["per_token"], rel=0.10)
    assert fit.noise["decode"].dist is not None and fit.residuals["decode"]["median_abs_rel_error"] < 0.06
    assert fit.model == "model-a"


def test_fitted_profile_simulates_like_the_truth():
    truth = parse_profile(truth_profile())
    fit = fit_engine(observations(probe_groups(truth)))
    raw = build_profile({"e": fit}, ["e"], "e", name="fitted", note="test", engine_sharing="one")
    fitted = parse_profile(raw)
    assert fitted.calibrated and raw["calibration"]["e"]["data"]["prefill_points"]["wait_s"]
    w = Workload("poisson", requests=40, rate_per_s=0.5, query_tokens=200, output_tokens=80)
    for policy in make_policies(["wait-all", "staircase-prefix-cache"], redundancies=[1]):
        a = simulate(moa(3), policy, w, truth, seed=7, max_tokens=96, progress=False).requests
        b = simulate(moa(3), policy, w, fitted, seed=7, max_tokens=96, progress=False).requests
        assert b["ttft_s"].median() == pytest.approx(a["ttft_s"].median(), rel=0.10), policy.name
        assert b["e2e_s"].median() == pytest.approx(a["e2e_s"].median(), rel=0.10), policy.name


def test_prefill_fit_finds_the_cost_of_new_tokens_after_a_cached_prefix():
    """First-token waits of calls with and without a cached prefix (as the cache-hit and
    cache-extend probes give): the fit separates the new tokens' attention over the
    cached ones (per_token_cached) from their own cost."""
    from staircase.calibration.fit import _fit_prefill

    rng = np.random.default_rng(5)
    p = np.array([16, 96, 256, 512, 896, 1344, 1792] * 2 + [20, 30, 25, 18, 28] + [128, 384] * 3, float)
    k = np.array([0] * 14 + [64, 256, 512, 896, 1344] + [0, 96, 256, 512, 896, 1344], float)
    truth = {"base": 0.02, "per_token": 2.5e-4, "per_token2": 1.2e-7, "per_token_cached": 1.8e-7}
    wait = 0.01 + truth["base"] + truth["per_token"] * p + truth["per_token2"] * p * p \
        + truth["per_token_cached"] * p * k
    pre = pd.DataFrame({"uncached": p, "cached_tokens": k, "wait_s": wait * rng.lognormal(0, 0.02, len(p))})
    prefill, overhead, _ = _fit_prefill(pre, 0.02, True, [])
    assert prefill["per_token_cached"] == pytest.approx(truth["per_token_cached"], rel=0.2)
    assert prefill["per_token"] == pytest.approx(truth["per_token"], rel=0.1)
    no_hits = _fit_prefill(pre[pre["cached_tokens"] == 0], 0.02, True, [])[0]
    assert no_hits["per_token_cached"] == 0.0  # not identified without calls that had both


def test_noise_choice_finds_the_distribution_family():
    rng = np.random.default_rng(3)
    r = scipy.stats.lognorm(s=0.2, scale=1.0).rvs(size=600, random_state=rng)
    nf = fit_noise(r)
    assert nf.dist is not None and len(nf.candidates) >= 3
    best = nf.candidates[0]
    assert best["ks_pvalue"] > 0.05 and best["mean"] == pytest.approx(np.mean(r), rel=0.02)
    lognorm = next(c for c in nf.candidates if c["dist"] == "lognorm")
    assert lognorm["params"]["s"] == pytest.approx(0.2, rel=0.1)
    assert fit_noise(r[:5]).dist is None  # too few points: no noise rather than a guess


def test_batch_size_that_never_varies_is_fixed_with_a_warning():
    prof = parse_profile(truth_profile())
    with pytest.warns(CalibrationWarning, match="batch size did not vary"):
        fit = fit_engine(observations(probe_groups(prof, levels=(1,), per_level=24)))
    assert fit.decode["per_seq"] == 0.0


# ---------------------------------------------------------------- bad input


def test_too_few_points_to_fit():
    prof = parse_profile(truth_profile())
    obs = observations(probe_groups(prof, levels=(1,), per_level=3))
    with pytest.raises(ConfigError) as err:
        fit_engine(obs)
    msg = str(err.value)
    assert msg.startswith("traces:") and "isolated first-token waits" in msg and "at least 5" in msg


def test_prompts_all_one_length_cannot_fit_prefill():
    prof = parse_profile(truth_profile())
    w = Workload("closed", requests=12, concurrency=1, query_tokens=300, output_tokens=60, length_sigma=0.0)
    t = simulate(moa(1), SinglePolicy(), w, prof, seed=1, max_tokens=64, progress=False)
    with pytest.raises(ConfigError, match="at 1 uncached prompt lengths"):
        fit_engine(observations([RunGroup("same", "single", t.chunks)]))


def test_mixed_engines_in_one_fit():
    prof = parse_profile(truth_profile())
    groups = probe_groups(prof, levels=(1,)) + probe_groups(prof, levels=(2,), engine_name="other")
    with pytest.raises(ConfigError) as err:
        observations(groups)
    assert "one engine per fit" in str(err.value) and "other" in str(err.value)
    assert observations(groups, engine="other").engine == "other"  # naming one is fine


def test_mixed_models_under_one_engine_name():
    prof = parse_profile(truth_profile())
    groups = probe_groups(prof, levels=(1,), model="model-a") + probe_groups(prof, levels=(2,), model="model-b")
    with pytest.raises(ConfigError, match="ran 2 models.*model-a, model-b"):
        observations(groups)


# ---------------------------------------------------------------- validation


def live_like_run(folder: Path, profile, *, concurrency=2, model="model-a", requests=10, seed=0) -> Path:
    """A results folder shaped like `staircase live`'s, made by the simulator."""
    args = {"topology": "moa", "proposers": 3, "layers": 1, "agents": 3, "rounds": 2,
            "policies": "wait-all,staircase-prefix-cache", "redundancy": "1", "scope": "first",
            "proposer_schedule": "8,16,32,64,128,256", "aggregator_schedule": "8,16,32,64,128,256", "max_wait_s": 0.5,
            "ttft_target_s": 1.0, "lead_in_s": 0.0,
            "policy_config": []}
    assert set(args) == set(TOPOLOGY_POLICY_KEYS)
    w = Workload("closed", requests=requests, concurrency=concurrency, query_tokens=120, output_tokens=48)
    topology, policies = topology_and_policies(argparse.Namespace(**args))  # as `staircase live` builds them
    for p in policies:
        simulate(topology, p, w, profile, seed=seed, max_tokens=64, progress=False).write(folder / "traces")
    config = {"command": "live", "cli_args": args, "concurrency": concurrency, "rate": None, "max_tokens": 64,
              "prompts": "sim", "engine_models": {"local": model},
              "slot_engines": {"proposer-0": "local", "proposer-1": "local", "proposer-2": "local", "aggregator": "local"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_replay_with_the_same_profile_reproduces_the_run(tmp_path):
    prof = parse_profile(truth_profile(noise_s=0.0))
    run = load_live_run(live_like_run(tmp_path / "run", prof))
    sim = replay(run, prof, replicates=1)
    assert set(sim) == {"wait-all", "staircase-prefix-cache-r1"}
    table = compare(run.requests, sim, run.label)
    ttft = table[table["metric"] == "ttft_s"]
    assert np.abs(ttft[["rel_err_p50", "rel_err_p90", "rel_err_p99"]].to_numpy()).max() < 1e-6
    assert table["wasserstein"].max() < 1e-6
    # phase by phase as well, and each phase is there
    with_chunks = replay(run, prof, replicates=1, with_chunks=True)
    phases = compare_phases(run.chunks, run.requests, with_chunks, run.label)
    assert set(phases["metric"]) == set(PHASES)
    measured = phases[phases["live_n"] > 0]
    assert set(measured["metric"]) == set(PHASES)  # the staircase decodes sources in chunks; wait-all the final
    assert np.abs(measured["rel_err_p50"].to_numpy()).max() < 1e-6
    # a slower profile shows up as a positive error
    slow = truth_profile(noise_s=0.0)
    slow["engines"]["e"]["decode_iteration_s"]["base"] *= 1.5
    table = compare(run.requests, replay(run, parse_profile(slow), replicates=1), run.label)
    e2e = table[table["metric"] == "e2e_s"]
    assert (e2e["rel_err_p50"] > 0.2).all() and (e2e["wasserstein"] > 0).all()
    # ... and the phases say where: decoding, not the proposers' first token (one prefill, no decode)
    phases = compare_phases(run.chunks, run.requests, replay(run, parse_profile(slow), replicates=1, with_chunks=True),
                            run.label).set_index(["policy", "metric"])["rel_err_p50"]
    assert phases[("wait-all", "final_decode_s")] > 0.2 and phases[("staircase-prefix-cache-r1", "source_decode_s")] > 0.2


def test_profile_of_another_model_is_refused(tmp_path):
    prof = parse_profile(truth_profile(model="model-a"))
    run = load_live_run(live_like_run(tmp_path / "run", prof, model="model-b", requests=3))
    with pytest.raises(ConfigError) as err:
        check_profile_model(prof, run)
    assert "fitted on model-a" in str(err.value) and "used model-b" in str(err.value)
    with pytest.warns(ValidationWarning, match="fitted on model-a"):
        table, checks, notes, _ = validate([run], prof, replicates=1, tokenizer="approx", allow_other_model=True)
    # TTFT p50, p90 and E2E p50 of two policies, as calibrated and at the run's measured speed
    assert len(checks[checks["timing"] == "calibrated"]) == 6 and len(checks) == 12 and notes
    with pytest.warns(ValidationWarning, match="not calibrated"):
        validate([run], load_profile("illustrative-gpu"), replicates=1, tokenizer="approx")


def test_not_a_live_folder(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_live_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"command": "sim"}))
    with pytest.raises(ConfigError, match="command: got 'sim'; allowed: live"):
        load_live_run(tmp_path)
    with pytest.raises(ConfigError, match="traces"):
        load_runs([tmp_path])


def staircase(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "staircase", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


def test_calibrate_and_validate_commands_from_traces(tmp_path):
    prof = parse_profile(truth_profile())
    # calibration traces: probe-like single calls written as a results folder
    cal = tmp_path / "cal"
    for g in probe_groups(prof):
        path = cal / "traces" / f"{g.source}.chunks.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        g.chunks.assign(policy=g.source).to_parquet(path)
    (cal / "config.json").write_text(json.dumps({"command": "calibrate", "engine_models": {"shared": "model-a"}}))
    r = staircase("calibrate", "--traces", str(cal), "--out", str(tmp_path / "fit"), "--profile-out",
                  str(tmp_path / "p.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| shared | model-a |" in r.stdout
    fitted = load_profile(tmp_path / "p.json")
    assert fitted.calibrated and fitted.engine_sharing == "one"
    assert (tmp_path / "fit" / "fit.png").is_file() and (tmp_path / "fit" / "profile.json").is_file()
    # validation on a held-out run: other policies, other concurrency
    run = live_like_run(tmp_path / "live", prof, concurrency=3, requests=12, seed=5)
    out = tmp_path / "val"
    r = staircase("validate", str(run), "--profile", str(tmp_path / "p.json"), "--replicates", "2",
                  "--tokenizer", "approx", "--out", str(out), "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    rows = pd.DataFrame(data["rows"])
    assert set(rows["policy"]) == {"wait-all", "staircase-prefix-cache-r1"}
    ttft = rows[rows["metric"] == "ttft_s"]
    assert (ttft["rel_err_p50"].abs() < 0.15).all(), ttft[["policy", "live_p50", "sim_p50"]]
    assert {"rel_err_p99", "wasserstein", "wasserstein_rel"} <= set(rows.columns)
    for f in ("validation.csv", "validation.json", "targets.csv"):
        assert (out / f).is_file()
    assert len(list(out.glob("cdf_*.png"))) == 1


@pytest.mark.parametrize("args,needle", [
    (["calibrate", "--traces", "/no/such/folder"], "traces: got '/no/such/folder'"),
    (["calibrate", "--probes", "huge"], "argument --probes: invalid choice: 'huge'"),
    (["validate", "/no/such/run"], "live run: got '/no/such/run'"),
    (["validate", "RUN", "--profile", "nope"], "profile: got 'nope'"),
    (["validate", "RUN", "--replicates", "0"], "replicates: got 0"),
])
def test_calibration_commands_bad_input(tmp_path, args, needle):
    prof = parse_profile(truth_profile())
    if "RUN" in args:
        args = [str(live_like_run(tmp_path / "run", prof, requests=2)) if a == "RUN" else a for a in args]
    r = staircase(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()  # nothing written on bad input


# ------------------------------------------------- the committed CPU runs


def test_bundled_profile_on_the_committed_held_out_runs():
    """The bundled profile against the four held-out live runs it ships with
    (calibration/data/cpu-smollm2/live-*: AlpacaEval prompts, MoA policies the probes
    never ran, concurrency 1 and 4). Figures as in calibration/data/cpu-smollm2/validation."""
    runs = [load_live_run(p) for p in sorted(CPU_RUNS.glob("live-*"))]
    assert len(runs) == 4
    profile = load_profile()
    for run in runs:
        assert check_profile_model(profile, run) == []  # same model, same engine sharing
    table, checks, notes, _ = validate(runs, profile, replicates=5, tokenizer="approx")
    assert notes == []  # no model mismatch, no speed drift
    checks = checks[checks["timing"] == "calibrated"]  # (the rows at each run's measured speed come beside)
    assert len(checks) == 36  # 4 runs x 3 policies x (TTFT p50, TTFT p90, E2E p50)
    c1_p50 = checks[checks["run"].str.contains("concurrency 1") & checks["target"].str.contains("p50")]
    assert c1_p50["pass"].all(), c1_p50  # one request at a time: every policy within 10 % at p50
    assert checks["pass"].sum() >= 30, checks[~checks["pass"]]  # 30 of 36 when E2E p50 joined the targets
    tokens = table[table["metric"] == "prompt_tokens"]
    assert (tokens["rel_err_p50"].abs() < 0.02).all()  # the replay builds prompts as long as the live ones


def test_speed_drift_between_calibration_and_a_run_is_reported():
    """The same held-out configuration recorded again 50 minutes later ran 30 % faster
    (the VM's speed drifted): validate says so instead of blaming the model."""
    profile = load_profile()
    same_hour = load_live_run(CPU_RUNS / "live-alpaca-0-7-c1")
    later = load_live_run(CPU_RUNS / "drift" / "repeat-live-alpaca-0-7-c1")
    assert 0.9 < decode_speed(same_hour, profile)["decode_time_ratio"] < 1.1
    assert 0.9 < decode_speed(same_hour, profile)["prefill_time_ratio"] < 1.1
    assert decode_speed(later, profile)["decode_time_ratio"] < 0.8
    with pytest.warns(ValidationWarning, match="decoded at 0.[67]. x the profile's time"):
        table, *_ = validate([later], profile, replicates=1, tokenizer="approx")
    assert (table["decode_time_ratio"] < 0.8).all()
    # replayed at the speed the run measured, the E2E error the drift caused mostly goes
    e2e = table[table["metric"] == "e2e_s"].set_index(["policy", "timing"])["rel_err_p50"].abs().unstack()
    assert (e2e["at run speed"] < 0.5 * e2e["calibrated"]).all(), e2e


def test_a_prefill_slower_than_the_profiles_is_reported_with_the_cpus():
    """Decode alone cannot see a machine whose prefill is many times slower (bf16 on a
    CPU without native bf16): the speed check measures the first-token waits too."""
    import copy

    profile = load_profile()
    raw = copy.deepcopy(profile.raw)
    for engine in raw["engines"].values():
        for k in ("base", "per_token", "per_token2"):
            engine["prefill_s"][k] /= 19.0
        engine["request_overhead_s"] /= 19.0
    fast_prefill = parse_profile(raw)
    run = load_live_run(CPU_RUNS / "live-alpaca-0-7-c1")
    speed = decode_speed(run, fast_prefill)
    assert speed["prefill_time_ratio"] > 10 and 0.9 < speed["decode_time_ratio"] < 1.1
    with pytest.warns(ValidationWarning, match=r"prefilled at 1\d\.\d\d x the profile's time .* on .*calibrated on"):
        table, *_ = validate([run], fast_prefill, replicates=1, tokenizer="approx")
    assert (table["prefill_time_ratio"] > 10).all()
