"""The machine record, engine settings per CPU kind, profiles that know their machine,
and the live watchdog's slow-or-dead decisions (on small streams of our own; the
same rules on real engines are in tests/test_live.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from staircase.live.engines import EngineError
from staircase.live.machine import describe, engine_settings
from staircase.live.watchdog import CallWatch, EnginePace, StallLimits
from staircase.sim.profile import load_profile, parse_profile
from staircase.errors import ConfigError
from staircase.machine import cpu_isa, differences, label

AVX2 = {"cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_isa": "avx2", "cores": 2}
ZEN5 = {"cpu_model": "AMD EPYC", "cpu_family": "26", "cpu_isa": "avx512_bf16", "cores": 2}
AMX = {"cpu_model": "Intel Xeon", "cpu_family": "6", "cpu_isa": "amx", "cores": 2}

# ------------------------------------------------------------------------ machine


def test_instruction_set_level_from_flags():
    assert cpu_isa({"avx2", "fma"}) == "avx2"
    assert cpu_isa({"avx2", "avx512f"}) == "avx512"
    assert cpu_isa({"avx2", "avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert cpu_isa({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}) == "amx"
    assert cpu_isa(set()) == "other"


def test_this_machine_is_described():
    m = describe()
    assert m["platform"] in ("cpu", "cuda") and m["cores"] >= 1 and m["cpu_isa"] in (
        "amx", "avx512_bf16", "avx512", "avx2", "other")
    assert m["cpu_model"] in label(m) or m["gpu"] in label(m)


@pytest.mark.parametrize("machine,dtype", [(AVX2, "float32"), (ZEN5, "bfloat16"), (AMX, "bfloat16"),
                                           ({"cpu_isa": "avx512", "cores": 4}, "float32")])
def test_cpu_dtype_follows_native_bf16(machine, dtype, monkeypatch):
    monkeypatch.delenv("STAIRCASE_DTYPE", raising=False)
    s = engine_settings(machine=machine)
    assert s["dtype"] == dtype and s["cpu_threads_bind"] and machine["cpu_isa"] in s["dtype_reason"]


def test_gpu_takes_the_models_dtype_and_no_cpu_binding():
    s = engine_settings(machine={"gpu": "NVIDIA H100 80GB HBM3", **AMX})
    assert s == {"dtype": "auto", "dtype_reason": "GPU NVIDIA H100 80GB HBM3: the model's own dtype",
                 "cpu_threads_bind": None}


def test_user_dtype_overrides_and_bad_dtype_names_the_field(monkeypatch):
    assert engine_settings("float32", machine=ZEN5)["dtype"] == "float32"
    assert "the default here: bfloat16" in engine_settings("float32", machine=ZEN5)["dtype_reason"]
    monkeypatch.setenv("STAIRCASE_DTYPE", "bfloat16")
    assert engine_settings(machine=AVX2)["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="dtype: got 'fp8'; allowed: auto, bfloat16, float16, float32"):
        engine_settings("fp8", machine=AVX2)


def test_machine_differences():
    assert differences(AVX2, ZEN5) == ["cpu_family '25' vs '26'", "cpu_isa 'avx2' vs 'avx512_bf16'"]
    assert differences(ZEN5, dict(ZEN5)) == []
    assert differences(None, ZEN5) == [] and differences({"cpu_isa": "amx"}, {"cpu_model": "x", "cpu_isa": "amx"}) == []
    assert differences({"gpu": "H100"}, ZEN5) == ["gpu 'H100' vs None"]


def test_profiles_know_their_machine():
    bundled = load_profile()
    assert bundled.machine["cpu_isa"] == "amx"  # calibrated on the AMX machine
    raw = json.loads(Path(bundled.source).read_text())
    raw["machine"] = "a laptop"
    with pytest.raises(ConfigError, match="profile.machine: got 'a laptop'"):
        parse_profile(raw)


def test_sim_says_which_machine_its_profile_describes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "staircase", "sim", "--requests", "5", "--no-figure", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1000:]
    assert "profile cpu-smollm2-135m: calibrated on a CPU (amx, 2 cores)" in r.stdout
    assert json.loads((tmp_path / "o" / "config.json").read_text())["profile"]["machine"]["cpu_isa"] == "amx"


def test_validate_warns_when_the_run_ran_on_another_machine():
    from staircase.calibration.runs import check_machine, load_live_run

    run = load_live_run(Path(__file__).parents[1] / "calibration/data/cpu-smollm2/live-alpaca-0-7-c1")
    assert check_machine(load_profile(), run) == []  # the committed runs record no machine: nothing to compare
    run.config["machine"] = {"platform": "cpu", "gpu": None, **AVX2}
    run.config["engine_settings"] = {"local": {"dtype": "float32"}}
    notes = check_machine(load_profile(), run)
    assert len(notes) == 2
    assert "ran on AMD EPYC (avx2, family 25, 2 cores)" in notes[0] and "cpu_isa 'amx' vs 'avx2'" in notes[0]
    assert "ran engines in float32" in notes[1] and "calibrated in bfloat16" in notes[1]


# ----------------------------------------------------------------------- watchdog


def test_stall_limits_reject_bad_values():
    with pytest.raises(ConfigError, match="gap_s: got 0"):
        StallLimits(gap_s=0)
    with pytest.raises(ConfigError, match="multiple: got -1"):
        StallLimits(multiple=-1)


def test_adaptive_limits_follow_the_engines_pace():
    lim = StallLimits(multiple=8, gap_floor_s=1.0, first_token_floor_s=2.0, floor_s_per_prompt_token=0.01)
    pace = EnginePace(lim)
    assert pace.gap_limit() == 1.0 and pace.first_token_limit(100) == 3.0  # floors before anything was seen
    pace.gaps.extend([0.5] * 20)
    pace.first_wait_per_token.extend([0.01, 0.05])
    assert pace.gap_limit() == pytest.approx(4.0)  # 8 x p95 gap
    assert pace.first_token_limit(100) == pytest.approx(40.0)  # 8 x slowest wait per token x tokens
    fixed = EnginePace(StallLimits(first_token_s=7.0, gap_s=3.0))
    fixed.gaps.extend([10.0])
    assert fixed.gap_limit() == 3.0 and fixed.first_token_limit(10_000) == 7.0


def test_engine_deadline_counts_every_call_in_flight():
    pace = EnginePace(StallLimits(first_token_s=5.0, gap_s=1.0))
    pace.last_delta_s = 100.0
    assert pace.deadline() == 101.0
    pace.waiting[1] = 110.0  # a call still inside its first-token limit keeps the engine alive
    assert pace.deadline() == 110.0


async def _stream(delays, tokens=1):
    for d in delays:
        await asyncio.sleep(d)
        yield tokens


async def _consume(watch: CallWatch, stream) -> int:
    n = 0
    try:
        while True:
            try:
                got = await watch.next(stream)
            except StopAsyncIteration:
                return n
            watch.on_delta(got, None)
            n += got
    finally:
        watch.close()


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_a_silent_stream_on_a_quiet_engine_is_lost_with_its_reason():
    pace = EnginePace(StallLimits(gap_s=0.3, first_token_s=0.3))
    with pytest.raises(EngineError, match="stalled 0.3s"):
        _run(_consume(CallWatch(pace, 10, final=False), _stream([0.0, 0.0, 3600])))
    with pytest.raises(EngineError, match="no first token in 0.3s"):
        _run(_consume(CallWatch(EnginePace(pace.limits), 10, final=False), _stream([3600])))


def test_a_call_queued_behind_a_streaming_one_is_not_lost():
    """Limit 0.3 s; the queued call hears nothing for 1.5 s while its engine streams to
    another call every 0.05 s (6x inside the limit)."""
    pace = EnginePace(StallLimits(gap_s=0.3, first_token_s=0.3))

    async def both():
        busy = _consume(CallWatch(pace, 10, final=False), _stream([0.05] * 30))
        queued = _consume(CallWatch(pace, 10, final=False), _stream([1.5, 0.05, 0.05]))
        return await asyncio.gather(busy, queued)
    assert _run(both()) == [30, 3]


def test_the_final_node_waits_while_its_engine_is_healthy():
    pace = EnginePace(StallLimits(gap_s=0.2, first_token_s=0.2))
    asked = []

    async def healthy():
        asked.append(1)
        return True
    assert _run(_consume(CallWatch(pace, 10, final=True, healthy=healthy), _stream([0.0, 1.0, 0.0]))) == 3
    assert asked  # it was asked, and the wait went on

    async def dead():
        return False
    with pytest.raises(EngineError, match="stalled 0.2s"):
        _run(_consume(CallWatch(EnginePace(pace.limits), 10, final=True, healthy=dead), _stream([0.0, 3600])))


# -------------------------------------------------------------- GPU and CPU engines


GPU = {"platform": "cuda", "gpu": "NVIDIA H100 80GB HBM3", **AMX}


@pytest.fixture
def model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("machine", [GPU, {"platform": "cpu", "gpu": None, **AVX2}], ids=["gpu", "cpu-avx2"])
def test_engines_take_the_machines_settings(machine, model_folder, monkeypatch):
    """The same engine classes on a GPU and on a CPU: only the settings differ (vLLM
    itself is not started here; on this machine test_live.py starts it for real)."""
    import staircase.live.machine
    from staircase.live.engines import VLLMEngine, VLLMServer

    monkeypatch.setattr(staircase.live.machine, "describe", lambda: machine)
    monkeypatch.delenv("STAIRCASE_DTYPE", raising=False)
    engine = VLLMEngine(model_folder)
    cmd, env = VLLMServer(model_folder, port=8123).command()
    if machine["gpu"]:
        assert engine.args["dtype"] == "auto" and engine.args["enforce_eager"] is False
        assert "block_size" not in engine.args and engine.settings["cpu_threads_bind"] is None
        assert cmd[cmd.index("--dtype") + 1] == "auto"
        assert "--enforce-eager" not in cmd and "--no-enable-chunked-prefill" not in cmd
    else:
        assert engine.args["dtype"] == "float32" and engine.args["enforce_eager"] is True
        assert engine.args["block_size"] == 32
        assert cmd[cmd.index("--dtype") + 1] == "float32" and "--enforce-eager" in cmd
        assert env["VLLM_CPU_OMP_THREADS_BIND"]


def test_the_cheap_deadline_never_passes_the_exact_one():
    """Calls wait on earliest_deadline() between deltas; a loss is decided on deadline()."""
    pace = EnginePace(StallLimits(gap_floor_s=1.0, multiple=8))
    pace.last_delta_s = 100.0
    pace.gaps.extend([0.5] * 20)  # adaptive gap limit 4 s
    assert pace.earliest_deadline() == 101.0 and pace.deadline() == 104.0
    pace.waiting[1] = 120.0
    assert pace.earliest_deadline() == pace.deadline() == 120.0
    fixed = EnginePace(StallLimits(gap_s=2.0))
    fixed.last_delta_s = 10.0
    assert fixed.earliest_deadline() == fixed.deadline() == 12.0
