"""`staircase emulate`: the simulator's engine model in real time behind the OpenAI API.

A real fleet on loopback (aiohttp server, SimPy engines), real HTTP clients; timing
compared with the profile's own formulas, not with the emulator's code."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the emulator's server is aiohttp (the live extra)")
import aiohttp  # noqa: E402

from staircase.deployment import deployment_from_dict  # noqa: E402
from staircase.errors import ConfigError  # noqa: E402
from staircase.sim.emulate import Fleet, client_config, fleet_models  # noqa: E402
from staircase.sim.emulate_http import serve_fleet  # noqa: E402
from staircase.sim.profile import load_profile  # noqa: E402

from staircase.live.engines.serve import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROFILE = load_profile("h100-moa")
ENGINE = "qwen3-8b"


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


async def _fleet(port: int, **kw):
    models = {f"{ENGINE}/0": PROFILE.engines[ENGINE]}
    return await serve_fleet(lambda clock: Fleet(models, clock, noise=False, record_writes=True, **kw), port=port)


async def _stream(session, url: str, prompt: str, max_tokens: int, chat: bool = False) -> list[dict]:
    body = {"max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    events = []
    async with session.post(f"{url}/v1/{'chat/' if chat else ''}completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def _submit_together(fleet: Fleet, batch: int, words: int, tokens: int):
    engine = next(iter(fleet.engines.values()))
    calls = [fleet.open_call(engine.name, str(i)) for i in range(batch)]
    for i, call in enumerate(calls):
        engine.submit(call, [f"p{i}"] + ["w"] * (words - 1), tokens, 1)
    return calls


def _offline(batch: int, words: int, tokens: int) -> list[list[tuple[int, float]]]:
    """The same calls on the same engine model in simulated time (no wall clock): the
    simulator's prediction, per call (tokens, seconds from the submit)."""
    from staircase.sim.emulate import Clock

    clock = Clock(asyncio.new_event_loop())
    calls = _submit_together(Fleet({ENGINE: PROFILE.engines[ENGINE]}, clock, noise=False), batch, words, tokens)
    clock.env.run()
    return [[(n, due - clock.t0) for n, due in c.pending] for c in calls]


def _real_time(batch: int, words: int, tokens: int):
    from staircase.sim.emulate import Clock

    async def go():
        fleet = Fleet({ENGINE: PROFILE.engines[ENGINE]}, Clock(asyncio.get_running_loop()), noise=False)
        start = time.monotonic()
        calls = _submit_together(fleet, batch, words, tokens)

        async def read(call):
            got = []
            while items := await call.next_tokens():
                got += [(n, time.monotonic() - start) for n, _ in items]
            return got
        return await asyncio.gather(*(read(c) for c in calls))
    return _run(go())


def test_one_call_streams_as_the_profile_formulas_say():
    """One call on an idle engine: its first token after the prefill, then one decode
    iteration per token, in real time, within 5 % of the profile's own formulas."""
    model = PROFILE.engines[ENGINE]
    words, tokens = 4000, 64
    (got,) = _real_time(1, words, tokens)
    assert sum(n for n, _ in got) == tokens
    decode = sum(model.decode_iteration_s(1, words + 1 + k) for k in range(tokens - 1))
    assert got[0][1] == pytest.approx(model.prefill_s(words), rel=0.05)
    assert got[-1][1] - got[0][1] == pytest.approx(decode, rel=0.05)


def test_a_fixed_batch_in_real_time_is_the_simulators_batch():
    """Eight calls submitted together: the emulator's tokens, seen in real time, come
    within 5 % of when the simulator's engine model makes them (the first call's prefill
    alone, the other seven in one mixed step with its decode, then batch-8 iterations)."""
    batch, words, tokens = 8, 900, 48
    predicted, seen = _offline(batch, words, tokens), _real_time(batch, words, tokens)
    firsts = sorted({round(p[0][1], 6) for p in predicted})
    assert len(firsts) == 2  # (the shape the docstring says: two steps before every call streams)
    for want, got in zip(predicted, seen):
        assert sum(n for n, _ in got) == tokens
        assert got[0][1] == pytest.approx(want[0][1], rel=0.05)
        assert got[-1][1] == pytest.approx(want[-1][1], rel=0.05)
        assert got[-1][1] - got[0][1] == pytest.approx(want[-1][1] - want[0][1], rel=0.05)


def test_usage_cached_tokens_the_prefix_cache_and_the_chat_route():
    async def go():
        port = free_port()
        fleet, runner = await _fleet(port)
        url = f"http://127.0.0.1:{port}/{ENGINE}/0"
        prompt = "shared system words " * 100
        try:
            async with aiohttp.ClientSession() as s:
                first = await _stream(s, url, prompt + "one", 4)
                again = await _stream(s, url, prompt + "two", 4)
                chat = await _stream(s, url, "hello there", 3, chat=True)
                async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                    metrics = await r.text()
        finally:
            await runner.cleanup()
        return fleet, first, again, chat, metrics

    fleet, first, again, chat, metrics = _run(go())
    a, b = fleet.calls[0], fleet.calls[1]
    assert a.cached_tokens == 0 and b.cached_tokens >= 288  # the shared 300 words, in whole blocks of 16
    assert b.first_due_s - b.arrived_s < a.first_due_s - a.arrived_s  # a hit prefills less
    assert first[0]["usage"]["prompt_tokens"] == 301 and first[-1]["choices"] == []
    assert again[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == b.cached_tokens
    assert [c["choices"][0]["finish_reason"] for c in first[:-1]] == [None, None, None, "length"]
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant" and chat[0]["object"] == "chat.completion.chunk"
    assert f'vllm:prefix_cache_hits_total{{engine="{ENGINE}/0",model_name="{ENGINE}"}} {b.cached_tokens}' in metrics
    assert "vllm:num_requests_running" in metrics and "vllm:num_requests_waiting" in metrics


def test_a_client_that_goes_away_aborts_its_call_and_bad_requests_name_the_field():
    async def go():
        port = free_port()
        fleet, runner = await _fleet(port)
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{base}/{ENGINE}/0/v1/completions",
                                  json={"prompt": "a b", "max_tokens": 2000, "stream": True}) as resp:
                    await resp.content.readline()
                for _ in range(100):  # the engine notices at its next write
                    await asyncio.sleep(0.02)
                    if fleet.calls[0].outcome != "running":
                        break
                engine = fleet.engines[f"{ENGINE}/0"].sim
                bad = [await (await s.post(f"{base}/nope/v1/completions", json={})).json(),
                       await (await s.post(f"{base}/{ENGINE}/0/v1/completions", json={"max_tokens": 0})).json()]
        finally:
            await runner.cleanup()
        return fleet, engine, bad

    fleet, engine, bad = _run(go())
    assert fleet.calls[0].outcome == "aborted" and fleet.calls[0].output_tokens < 2000
    assert not engine.batch and engine.in_flight == 0
    assert "engine: got 'nope'; allowed: qwen3-8b/0" in bad[0]["error"]["message"]
    assert bad[1]["error"]["message"].startswith("max_tokens: got 0; allowed:")


def test_client_config_points_live_at_every_replica():
    """The engines and deployment files the emulator writes build one http engine per
    replica, each with its own URL (a list in the config), behind the deployment's routers."""
    from staircase.live.engines.config import engines_from_config
    from staircase.topology import moa

    raw = {"pools": {"small": {"model": "qwen3-8b", "replicas": 2}, "agg": {"model": "llama-70b-tp4-agg"}},
           "slots": {"proposers": ["small"], "aggregator": "agg"}}
    deployment = deployment_from_dict(raw, models=list(PROFILE.engines))
    models = fleet_models(PROFILE, deployment)
    assert list(models) == ["small/0", "small/1", "agg/0"]
    config, pools = client_config(models, "http://127.0.0.1:9", PROFILE, deployment)
    assert config["engines"]["small"]["url"] == ["http://127.0.0.1:9/small/0", "http://127.0.0.1:9/small/1"]
    built = engines_from_config(config, moa(2), deployment=deployment_from_dict(pools, models=list(config["engines"])))
    assert [e.base_url for e in built.pools["small"]] == config["engines"]["small"]["url"]
    assert built.pools["agg"][0].model == "llama-70b-tp4-agg"
    config["engines"]["small"]["url"] = config["engines"]["small"]["url"][:1] * 3
    with pytest.raises(ConfigError, match=r"config.engines.small.url.*one per replica of pool small \(2\)"):
        engines_from_config(config, moa(2), deployment=deployment_from_dict(pools, models=list(config["engines"])))
    with pytest.raises(ConfigError, match="replicas: got 0"):
        fleet_models(PROFILE, None, 0)


def test_staircase_emulate_serves_a_plan_deployment_and_writes_its_calls(tmp_path):
    """The command: the plan's deployment file, the files it writes, the stop's CSV."""
    port = free_port()
    plan = ROOT / "benchmarks/results/plan-azure-h100/deployment-staircase-prefix-cache-r2.json"
    proc = subprocess.Popen([sys.executable, "-m", "staircase", "emulate", "--deployment", str(plan), "--port",
                             str(port), "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120  # a slow CPU's import and fleet build
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/aggregator/1/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "a b c", "max_tokens": 3}).encode(),
                                     headers={"X-Request-Id": "r-1"})
        answer = json.load(urllib.request.urlopen(req, timeout=60))
    finally:
        proc.terminate()
        out = proc.communicate(timeout=120)[0]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    engines = json.loads((tmp_path / "engines.json").read_text())["engines"]
    assert sorted(engines) == ["aggregator", "llama-70b-tp4", "qwen3-32b-tp2", "qwen3-8b"]
    assert engines["aggregator"]["model"] == "llama-70b-tp4-agg" and len(engines["aggregator"]["url"]) == 2
    rows = (tmp_path / "calls.csv").read_text().splitlines()
    assert len(rows) == 2 and ",r-1," in rows[1] and rows[1].endswith(",ok"), out
    assert "1 calls; timing in" in out


def test_placement_ejects_a_replica_that_keeps_failing_and_tries_it_after_the_cooldown():
    from staircase.deployment import Placement

    class R:
        def __init__(self, name):
            self.name, self.in_flight, self.kv_tokens = name, 0, 0

    a, b = R("p/0"), R("p/1")
    d = deployment_from_dict({"pools": {"p": {"model": "m", "replicas": 2, "router": "round-robin"}},
                              "slots": {"proposers": ["p"], "aggregator": "p"}})
    place = Placement(d, ["proposer-0"], {"p": [a, b]}, eject_after=3, cooldown_s=10.0)
    assert {place.pick("proposer-0", 0, "n", 0.0).name for _ in range(4)} == {"p/0", "p/1"}
    assert [place.outcome(a, False, 1.0) for _ in range(3)] == [False, False, True]
    assert {place.pick("proposer-0", 0, "n", 5.0).name for _ in range(4)} == {"p/1"}  # ejected
    assert place.outcome(b, False, 5.0) is False  # one failure of b: not ejected, and never both
    assert {place.pick("proposer-0", 0, "n", 11.0).name for _ in range(4)} == {"p/0", "p/1"}  # tried again
    place.outcome(a, False, 11.0), place.outcome(a, True, 11.5), place.outcome(a, False, 12.0)
    assert place.failures[id(a)] == 1 and place.ejections == [(1.0, "p/0")]  # an answer resets the count


def test_a_pool_stops_sending_to_a_failing_replica_and_its_calls_go_to_the_other():
    """A pool of two proposer replicas, one behind a server that answers every call with
    503 (the engine tries each call 4 times), one emulated: after 3 failed calls the bad
    replica is ejected, every later call goes to the good one, every request answers."""
    from staircase.live.chaos import ChaosProxy
    from staircase.live.engines import HTTPEngine
    from staircase.live.runner import LiveRunner
    from staircase.policies import StaircasePolicy
    from staircase.topology import moa

    async def go():
        port = free_port()
        fleet, emu = await _fleet(port)
        bad = await ChaosProxy().start()
        good_url = f"http://127.0.0.1:{port}/{ENGINE}/0"
        engines = {"bad": HTTPEngine(bad.url_for("http503"), "m", name="p/0"),
                   "good": HTTPEngine(good_url, "m", name="p/1"), "agg": HTTPEngine(good_url, "m", name="agg/0")}
        d = deployment_from_dict({"pools": {"p": {"model": "m", "replicas": 2, "router": "least-loaded"},
                                            "agg": {"model": "m"}}, "slots": {"proposers": ["p"], "aggregator": "agg"}})
        topology = moa(3)
        slot_engines = {n.slot: engines["agg"] if n.slot == "aggregator" else engines["good"] for n in topology.nodes}
        runner = LiveRunner(slot_engines, topology, max_tokens=8, deployment=d, request_timeout_s=60,
                            pools={"p": [engines["bad"], engines["good"]], "agg": [engines["agg"]]})
        await runner.start()
        try:
            rows = [await runner.run_request(StaircasePolicy(redundancy=2), i, f"question {i} " * 20)
                    for i in range(6)]
        finally:
            await runner.close()
            await bad.close()
            await emu.cleanup()
        return rows, runner, bad, fleet

    rows, runner, bad, fleet = _run(go())
    assert [r.outcome for r in rows] == ["ok"] * 6, [r.error for r in rows]
    assert runner.placement.ejections and runner.placement.ejections[0][1] == "p/0"
    # 4 tries per call; the calls placed on it before its third failure was known (a request places
    # its 3 proposers at once), then none
    assert bad.calls % 4 == 0 and 12 <= bad.calls <= 20
    on_good = {}
    for c in fleet.calls:
        if "L0.p" in c.request_id:
            job = int(c.request_id.split("-")[-4])
            on_good[job] = on_good.get(job, 0) + 1
    assert on_good[4] == on_good[5] == 3  # after the ejection every proposer call went to the good replica


def test_the_gateway_benchmark_splits_the_latency_on_an_emulated_fleet(tmp_path):
    """`staircase serve` on an emulated fleet, a few users for a few seconds: the
    benchmark reports the gateway's added latency for every answered request (figures,
    not asserted: a benchmark, not a timed test)."""
    import pandas as pd

    out = tmp_path / "gs"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gateway_scale.py"), "--users", "2", "--azure", "",
                           "--duration", "4", "--proposers", "3", "--proposer-tokens", "32", "--answer-tokens", "16",
                           "--workers", "1,2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = pd.read_csv(out / "gateway-scale.csv")
    assert list(rows.workers) == [1, 2]
    for _, row in rows.iterrows():
        assert row["ok"] == row["requests"] == row["matched"] > 0
        for name in ("added_ttft_p50_ms", "added_ttft_p99_ms", "added_itl_p99_ms", "gateway_cpu_us_per_token"):
            assert row[name] == row[name] and row[name] > -1.0, name  # measured (not NaN), not below zero
    assert rows.busiest_worker_share.iloc[0] == 1.0 and 0.5 <= rows.busiest_worker_share.iloc[1] <= 1.0
    print(done.stdout[-1500:])


def test_the_litellm_comparison_needs_its_command_and_subtracts_the_direct_baseline(tmp_path):
    """benchmarks/gateway_anchor.py (LiteLLM is installed beside, not here): without the
    command it stops naming --litellm; its arithmetic on rows of the three gateways."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gateway_anchor.py"), "--litellm",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--litellm: got" in done.stderr and "litellm[proxy]==" in done.stderr
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gateway_anchor import added, ratios

    rows = [{"gateway": g, "users": 1, "ttft_p50_ms": t, "ttft_p99_ms": 2 * t, "itl_p50_ms": 1.0, "itl_p99_ms": 2.0,
             "cpu_ms_per_request": c, "cpu_us_per_token": c / 10} for g, t, c in
            (("direct", 10.0, 0.0), ("staircase", 12.0, 4.0), ("litellm", 18.0, 16.0))]
    df = added(rows)
    assert list(df.added_ttft_p50_ms) == [0.0, 2.0, 8.0] and list(df.added_ttft_p99_ms) == [0.0, 4.0, 16.0]
    (r,) = ratios(df)
    assert r["added_ttft_p50_ms_staircase_over_litellm"] == 0.25 and r["cpu_ms_per_request_staircase_over_litellm"] == 0.25
