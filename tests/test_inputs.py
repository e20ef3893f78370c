"""Workloads, profiles and the CLI: good input works, bad input gets a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from staircase.sim.profile import load_profile, parse_profile
from staircase.workload import Workload, azure_requests, make_requests, read_azure
from staircase.errors import ConfigError
from staircase.trace import read_requests

SHARED_AZURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "azure-llm-2023" / "conv.csv"

# -------------------------------------------------------------------- workloads


def test_poisson_rate_and_lengths():
    reqs = make_requests(Workload("poisson", requests=4000, rate_per_s=2.0, query_tokens=200), seed=1)
    arrivals = np.array([r.arrival_s for r in reqs])
    assert arrivals[0] == 0 and (np.diff(arrivals) >= 0).all()
    assert len(reqs) / arrivals[-1] == pytest.approx(2.0, rel=0.05)
    assert np.median([r.query_tokens for r in reqs]) == pytest.approx(200, rel=0.05)


def test_gamma_arrivals_have_the_asked_cv():
    reqs = make_requests(Workload("gamma", requests=6000, rate_per_s=1.0, cv=3.0), seed=2)
    gaps = np.diff([r.arrival_s for r in reqs])
    assert gaps.mean() == pytest.approx(1.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)


def test_workloads_are_pure_functions_of_the_seed():
    w = Workload("poisson", requests=50)
    assert make_requests(w, 3) == make_requests(w, 3)
    assert make_requests(w, 3) != make_requests(w, 4)


def test_bundled_azure_copy_equals_the_shared_data():
    bundled = read_azure()
    assert len(bundled) == 19366
    if SHARED_AZURE.is_file():
        shared = read_azure(SHARED_AZURE)
        assert (bundled["ContextTokens"].to_numpy() == shared["ContextTokens"].to_numpy()).all()
    reqs = azure_requests(None, 100, time_scale=2.0)
    assert reqs[1].arrival_s == pytest.approx(bundled["arrival_s"].iloc[1] / 2)


def test_azure_trace_with_missing_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"TIMESTAMP": ["2023-11-16 18:15:46.68"], "ContextTokens": [10]}).to_csv(bad, index=False)
    with pytest.raises(ConfigError, match="trace columns: .* must include GeneratedTokens"):
        read_azure(bad)
    with pytest.raises(ConfigError, match="trace: got .*missing.csv"):
        read_azure(tmp_path / "missing.csv")


@pytest.mark.parametrize("kwargs,field", [({"kind": "uniform"}, "workload"), ({"requests": 0}, "requests"),
                                          ({"rate_per_s": -1.0}, "rate_per_s"), ({"concurrency": 0}, "concurrency")])
def test_bad_workloads_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}: got"):
        Workload(**kwargs)


# --------------------------------------------------------------------- profiles


def test_bundled_profiles_say_whether_they_are_calibrated():
    p = load_profile()
    assert p.calibrated is True and p.engine_sharing == "one"
    assert "calibrate" in p.note and p.raw["calibration"]  # the fit's residuals and data travel with it
    gpu = load_profile("illustrative-gpu")
    assert gpu.calibrated is False and "NOT CALIBRATED" in gpu.note
    h100 = load_profile("h100-moa")  # GPU engines from the kernel database: each says where it comes from
    assert h100.calibrated is False and len(h100.engines) == 4
    for raw in h100.raw["engines"].values():
        assert raw["provenance"]["gpu"] == "h100_sxm" and raw["fit_error"]["decode_iteration_s"]["mape"] < 0.05
    assert all(m.max_num_batched_tokens == 8192 for m in h100.engines.values())


def test_unknown_profile_name_lists_the_bundled_ones():
    with pytest.raises(ConfigError) as err:
        load_profile("no-such-profile")
    assert "illustrative-gpu" in str(err.value) and "default" in str(err.value)


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("schema"), "profile.schema"),
    (lambda r: r["engines"]["small-8b"]["prefill_s"].pop("per_token"), "engines.small-8b.prefill_s.per_token"),
    (lambda r: r["engines"]["small-8b"].__setitem__("max_batch_size", 0), "engines.small-8b.max_batch_size"),
    (lambda r: r["engines"]["small-8b"]["noise"].__setitem__("decode", {"dist": "nonsense"}),
     "engines.small-8b.noise.decode.dist"),
    (lambda r: r["slots"].__setitem__("aggregator", "gpt-9"), "profile.slots.aggregator"),
    (lambda r: r.__setitem__("engine_sharing", "some"), "profile.engine_sharing"),
])
def test_malformed_profiles_name_the_field(mutate, field):
    raw = json.loads(json.dumps(load_profile("illustrative-gpu").raw))
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        parse_profile(raw)
    assert str(err.value).startswith(field + ":")


def test_profile_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="an existing profile JSON file"):
        load_profile(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="valid JSON"):
        load_profile(broken)


def test_trace_reader_checks_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"request_id": [1]}).to_parquet(path)
    with pytest.raises(ConfigError, match="must include policy"):
        read_requests(path)


# -------------------------------------------------------------------------- CLI


def staircase(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "staircase", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


def test_sim_json_output_and_results_folder(tmp_path):
    out = tmp_path / "run"
    r = staircase("sim", "--requests", "30", "--format", "json", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data["policies"]) == {"wait-all", "staircase-standard-r1", "staircase-prefix-cache-r1", "single"}
    for name, m in data["policies"].items():
        for key in ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "output_tokens_per_s_p50", "prompt_tokens_mean",
                    "cached_tokens_mean"):
            assert isinstance(m[key], (int, float)), (name, key)
    assert data["policies"]["staircase-prefix-cache-r1"]["ttft_p50_s"] < data["policies"]["wait-all"]["ttft_p50_s"]
    for f in ("config.json", "summary.csv", "summary.json", "ttft_by_policy.png",
              "traces/wait-all.requests.parquet", "traces/staircase-prefix-cache-r1.chunks.parquet"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert config["workload"]["requests"] == 30 and config["profile"]["calibrated"] is True
    assert len(read_requests(out / "traces" / "single.requests.parquet")) == 30
    assert r.stderr == ""  # no progress bar when stderr is not a terminal


def test_sim_table_output_mad(tmp_path):
    r = staircase("sim", "--topology", "mad", "--agents", "3", "--rounds", "2", "--requests", "10",
                  "--policies", "wait-all,staircase-prefix-cache", "--redundancy", "0,1", "--summary-only",
                  "--no-figure", "--out", str(tmp_path / "mad"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "staircase-prefix-cache-r0" in r.stdout and "staircase-prefix-cache-r1" in r.stdout
    assert "TTFT p50 s" in r.stdout
    assert not (tmp_path / "mad" / "traces" / "wait-all.chunks.parquet").exists()


@pytest.mark.parametrize("args,needle", [
    (["--redundancy", "3"], "redundancy: got 3; allowed: 0 <= r < 3"),
    (["--policies", "wait-all,magic"], "policy: got 'magic'"),
    (["--proposer-schedule", "8,0,256"], "proposer_schedule: got '8,0,256'"),
    (["--aggregator-schedule", ""], "aggregator_schedule: got ''"),
    (["--topology", "ring"], "argument --topology: invalid choice: 'ring'"),
    (["--workload", "azure", "--trace", "/no/such.csv"], "trace: got '/no/such.csv'"),
    (["--profile", "/no/such.json"], "profile: got '/no/such.json'"),
    (["--requests", "0"], "requests: got 0"),
])
def test_sim_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    r = staircase("sim", *args, "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_help_explains_options(tmp_path):
    r = staircase("sim", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--redundancy" in r.stdout and "--summary-only" in r.stdout
