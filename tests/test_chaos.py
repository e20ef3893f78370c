"""Chaos: faults at random moments (``staircase.live.chaos``) and the chaos run
(``benchmarks/chaos.py``, small) on real vLLM servers and a real in-process engine."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from staircase.live.chaos import AGGREGATOR_FREEZE, KINDS, ChaosProxy, Fault, ProcessFaults, draw_faults
from staircase.live.engines import EngineError, HTTPEngine, Sampling
from staircase.errors import ConfigError
from staircase.prompts import Message, Piece, Prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPT = Prompt([Message("user", [Piece(("q",), 3, "Say hi.")])], 10, 0)


def test_a_fault_plan_is_the_seeds_and_each_cycle_holds_every_kind():
    plan = draw_faults(3, 600, 5)
    assert plan == draw_faults(3, 600, 5) and plan != draw_faults(4, 600, 5)
    assert all(0 < a.at_s < b.at_s <= 600 for a, b in zip(plan, plan[1:]))
    for i in range(0, len(plan) - len(KINDS) + 1, len(KINDS)):
        assert sorted(f.kind for f in plan[i:i + len(KINDS)]) == sorted(KINDS)
    assert all(2 <= f.duration_s <= 20 for f in plan if f.kind == "freeze")
    assert all(1 <= f.calls <= 4 for f in plan if f.kind in ("http503", "http429", "cut"))
    assert 600 / 5 * 0.6 < len(plan) < 600 / 5 * 1.4


@pytest.mark.parametrize("kwargs,field", [({"kinds": ("kill", "reboot")}, "kinds"), ({"every_s": 0}, "every_s"),
                                          ({"freeze_s": (5, 1)}, "freeze_s")])
def test_a_bad_plan_names_its_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}: got"):
        draw_faults(0, 60, **{"every_s": 3, **kwargs})


class SleepServer:
    """A stand-in for ``VLLMServer`` in the signal tests: a sleeping process in a session
    of its own, started again by ``start``."""

    def __init__(self):
        self.proc, self.starts = None, 0

    def start(self):
        self.proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
        self.starts += 1
        return self

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def status(server, want: str | None = None) -> str:
    """The process's status (waiting up to 5 s for ``want``: a signal lands a moment later)."""
    end = time.monotonic() + 5
    while (got := psutil.Process(server.proc.pid).status()) != want and want and time.monotonic() < end:
        time.sleep(0.01)
    return got


def test_freeze_thaw_and_kill_restart_are_real_signals_and_skip_what_is_not_up():
    servers = {"a": SleepServer().start(), "b": SleepServer().start()}

    async def scenario():
        faults = ProcessFaults(servers, aggregator_pids=lambda: [])
        frozen = faults.inject(Fault(0, "freeze", pick=0.0, duration_s=0.3))
        assert frozen.target == "a" and status(servers["a"], psutil.STATUS_STOPPED) == psutil.STATUS_STOPPED
        killed = faults.inject(Fault(0, "kill", pick=0.9))  # "a" is frozen: "b" is the only one up
        assert killed.target == "b" and faults.state["b"] in ("down", "up")
        skipped = faults.inject(Fault(0, AGGREGATOR_FREEZE, duration_s=1))
        assert not skipped.injected and skipped.note == "no process to freeze"
        await asyncio.sleep(0.6)
        assert status(servers["a"], psutil.STATUS_SLEEPING) != psutil.STATUS_STOPPED and faults.state == {"a": "up", "b": "up"}
        assert servers["b"].starts == 2 and servers["b"].proc.poll() is None
        faults.inject(Fault(0, "freeze", duration_s=60))
        faults.inject(Fault(0, "freeze", duration_s=60))
        none_up = faults.inject(Fault(0, "kill"))
        assert not none_up.injected and none_up.note == "no proposer server up"
        await faults.stop()  # thaws both at once
        return faults
    try:
        faults = asyncio.run(asyncio.wait_for(scenario(), 30))
        assert all(status(s, psutil.STATUS_SLEEPING) != psutil.STATUS_STOPPED for s in servers.values())
        assert [r["kind"] for r in faults.table()] == ["freeze", "kill", AGGREGATOR_FREEZE, "freeze", "freeze", "kill"]
    finally:
        for s in servers.values():
            s.stop()


def test_the_proxy_passes_streams_and_delivers_its_bursts_in_order():
    async def scenario():
        up = await ChaosProxy(tokens=5).start()  # the upstream: the same server as a stand-in engine, no faults
        proxy = await ChaosProxy(up.url).start()
        engine = HTTPEngine(proxy.url, "model", retries=0)  # (each burst reaches the caller: no tries again)
        await engine.start()

        async def call():
            try:
                return sum([d.tokens async for d in engine.stream("r", PROMPT, 5, Sampling())])
            except EngineError as err:
                return err.reason
        try:
            proxy.burst("http503", 1)
            proxy.burst("cut", 1)
            proxy.burst("http429", 2)
            got = [await call() for _ in range(6)]
        finally:
            await engine.close()
            await proxy.close()
            await up.close()
        return got, proxy
    got, proxy = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert got == ["http 503", "truncated stream", "http 429", "http 429", 5, 5]
    assert proxy.calls == 6 and dict(proxy.done) == {"http503": 1, "cut": 1, "http429": 2}
    with pytest.raises(ConfigError, match="^kind: got 'kill'"):
        proxy.burst("kill", 1)


def test_the_fault_server_serves_every_fault_on_its_own_path():
    """No upstream: a stand-in engine whose every call on /<fault>/ gets that fault, as the
    live fault tests use it; the reasons are the HTTP engine's own words."""
    async def scenario():
        server = await ChaosProxy(tokens=4).start()
        out = {}
        try:
            for mode in ("http503", "http429", "cut", "malformed", "truncated", None):
                engine = HTTPEngine(server.url_for(mode) if mode else server.url, "model")
                await engine.start()
                try:
                    out[mode] = sum([d.tokens async for d in engine.stream("r", PROMPT, 8, Sampling())])
                except EngineError as err:
                    out[mode] = err.reason
                finally:
                    await engine.close()
        finally:
            await server.close()
        return out, server
    got, server = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert got == {"http503": "http 503", "http429": "http 429", "cut": "truncated stream",
                   "malformed": "malformed stream", "truncated": "truncated stream", None: 4}
    # a 503 or 429 is tried again (3 times) before the engine gives up: 4 calls each
    assert server.calls == 12 and dict(server.done) == {"http503": 4, "http429": 4, "cut": 1, "malformed": 1,
                                                         "truncated": 1}
    with pytest.raises(ConfigError, match="^mode: got 'kill'"):
        server.url_for("kill")


@pytest.mark.live
def test_the_chaos_run_ends_every_request_and_keeps_every_row(tmp_path):
    """benchmarks/chaos.py, small: three proposer servers (one behind the proxy) and an
    in-process aggregator; in the first 12 s one fault of each kind (seed 3), then the
    aggregator frozen for longer than the 20 s request timeout. Every request ends,
    finished or failed with a named reason; every row is on disk; a request sent after the
    aggregator thawed (without a timeout, so that this holds at any machine's speed)
    finishes. How many of the 20 finish inside their timeout depends on the machine, so
    that is not asserted."""
    out = tmp_path / "chaos"
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--requests", "20", "--rate", "0",
                        "--concurrency", "3", "--max-out", "0", "--seed", "3", "--every-s", "3", "--faults-for-s", "12", "--request-timeout-s", "20",
                        "--aggregator-freeze-at-s", "16", "--aggregator-freeze-s", "25", "--out", str(out)],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(s["faults_injected"]) == set(KINDS) | {AGGREGATOR_FREEZE}, s
    assert s["ended"] == 20 and s["hung"] == 0 and s["not_ended"] == 0 and s["failed_otherwise"] == 0, s
    assert s["rows_lost"] == 0 and s["rows_twice"] == 0 and s["rows_on_disk"] == 20, s
    assert s["answers_without_their_chunks"] == 0 and s["over_timeout"] == 0, s
    assert s["failed_at_request_timeout"] >= 1, s
    assert s["after_thaw"]["outcome"] == "ok", s["after_thaw"]  # the run goes on once the aggregator thawed
    assert s["inputs_lost"] >= 1 and sum(s["proxy_faults_delivered"].values()) >= 1, s
    requests = pd.read_csv(out / "requests.csv")
    assert (requests["took_s"] <= 20 + 5).all() and len(requests) == 20
    failed = requests[requests["outcome"] == "error"]
    named = failed["error"].str.contains(r"L0\.p\d \(") | failed["error"].str.contains("timed out after 20s")
    assert named.all(), failed["error"].tolist()
    faults = pd.read_csv(out / "faults.csv")
    assert len(faults) == s["faults_skipped"] + sum(s["faults_injected"].values())
    assert (out / "timeline.png").stat().st_size > 10_000 and "rows lost 0" in r.stderr
    print(f"chaos run: {time.monotonic() - t:.0f} s; {s}")


def test_a_503_or_429_before_the_first_token_is_tried_again_after_retry_after():
    """A burst of two 503s and a 429 on the next calls: the engine tries again (after the
    server's Retry-After) and streams the answer; a burst longer than its retries fails."""
    from staircase.live.engines.http_engine import retry_delay

    async def scenario():
        server = await ChaosProxy(tokens=4).start()
        server.retry_after = "0.2"
        engine = HTTPEngine(server.url, "model")
        await engine.start()
        try:
            server.burst("http503", 2)
            server.burst("http429", 1)
            t = time.monotonic()
            tokens = sum([d.tokens async for d in engine.stream("r", PROMPT, 8, Sampling())])
            waited = time.monotonic() - t
            server.burst("http503", 4)
            with pytest.raises(EngineError, match="^http 503$"):
                [d async for d in engine.stream("r", PROMPT, 8, Sampling())]
        finally:
            await engine.close()
            await server.close()
        return tokens, waited, server
    tokens, waited, server = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert tokens == 4 and waited >= 0.6 and server.calls == 8
    assert retry_delay("2", 0, 0.25) == 2.0 and retry_delay("600", 0, 0.25) == 10.0
    assert retry_delay(None, 2, 0.25) == 1.0 and retry_delay("Wed, 21 Oct 2015 07:28:00 GMT", 0, 0.25) == 0.25
