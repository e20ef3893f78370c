"""Faults at random moments, for chaos runs (``benchmarks/chaos.py``).

Three ways to hurt a deployment, all on 127.0.0.1 and all undone at the end:

- ``ChaosProxy``: the one fault-injecting server: a small proxy in front of one
  OpenAI-compatible server (or, without one, a stand-in engine of its own) that answers
  the next calls with bursts of 503 or 429, cuts their streams off, stalls them, sends
  malformed or truncated streams, or streams slowly but alive (the tests' faulty
  proposers);
- ``ProcessFaults``: a proposer server killed (SIGKILL, then started again on the same
  port) or frozen (SIGSTOP, SIGCONT later), and this process's own vLLM engine core
  (the in-process aggregator's) frozen;
- ``draw_faults``: when, what and for how long, from a seed: moments at Poisson
  intervals, kinds in a shuffled cycle (a short run still sees every kind).

``ProcessFaults.run`` injects a plan while a run goes on and logs every fault (kind,
target, when, for how long, or why it was skipped: no server up to hurt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Mapping

from staircase.errors import ConfigError

from .engines.serve import VLLMServer, free_port

PROXY_KINDS = ("http503", "http429", "cut")
SERVER_KINDS = ("kill", "freeze")
KINDS = SERVER_KINDS + PROXY_KINDS
AGGREGATOR_FREEZE = "freeze-aggregator"


@dataclass(frozen=True)
class Fault:
    """One fault of a plan: at ``at_s`` (seconds from the run's start), ``kind``;
    ``pick`` in [0, 1) chooses the target among those up at that moment; ``duration_s``
    of a freeze; ``calls`` of a proxy burst."""

    at_s: float
    kind: str
    pick: float = 0.0
    duration_s: float = 0.0
    calls: int = 0


def draw_faults(seed: int, horizon_s: float, every_s: float, kinds=KINDS, freeze_s=(2.0, 20.0),
                burst_calls=(1, 4)) -> list[Fault]:
    """Faults up to ``horizon_s`` at Poisson moments ``every_s`` apart on average; each
    cycle of ``len(kinds)`` faults holds every kind once, in a shuffled order."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ConfigError("kinds", ",".join(kinds), f"some of {', '.join(KINDS)}")
    if not every_s > 0:
        raise ConfigError("every_s", every_s, "a number of seconds > 0")
    if not 0 < freeze_s[0] <= freeze_s[1]:
        raise ConfigError("freeze_s", f"{freeze_s[0]:g}-{freeze_s[1]:g}", "seconds, 0 < shortest <= longest")
    rng, faults, t, cycle = random.Random(seed), [], 0.0, []
    while True:
        t += rng.expovariate(1.0 / every_s)
        if t > horizon_s:
            return faults
        if not cycle:
            cycle = rng.sample(list(kinds), len(kinds))
        kind = cycle.pop()
        faults.append(Fault(round(t, 3), kind, rng.random(),
                            round(rng.uniform(*freeze_s), 3) if kind == "freeze" else 0.0,
                            rng.randint(*burst_calls) if kind in PROXY_KINDS else 0))


CALL_FAULTS = PROXY_KINDS + ("stall", "malformed", "truncated")  # what one call can be given


class ChaosProxy:
    """The one fault-injecting server: 127.0.0.1:<port>, OpenAI-compatible, in front of
    ``upstream`` (completions pass through streamed) or, with no upstream, answering
    itself (a stand-in engine: up to ``tokens`` words, no wait).

    A completion gets a fault from the queue ``burst`` fills (in order), or every call on
    the path ``/<fault>/v1/...`` gets that fault. Faults (``CALL_FAULTS``): ``http503``,
    ``http429`` (answered before any token, with ``Retry-After: retry_after``), ``cut`` (the connection closed after
    ``cut_after`` events), ``stall`` (silent after two events, the connection held
    open), ``malformed`` (an event that is not JSON), ``truncated`` (ends after two events
    without a finish or [DONE]). ``/slow/v1/...`` is slow but alive: one call streams at a
    time (the others queue), its first word after ``slow[0]`` s, then one every
    ``slow[1]`` s, ``slow[2]`` words. An upstream that does not answer is a 502."""

    def __init__(self, upstream: str | None = None, cut_after: int = 3, tokens: int = 16,
                 slow: tuple[float, float, int] = (3.0, 0.4, 10)):
        self.upstream = upstream.rstrip("/") if upstream else None
        self.cut_after, self.tokens, self.slow = cut_after, tokens, slow
        self.retry_after = "0"  # the Retry-After of its 503s and 429s (seconds, as text)
        self.port = free_port()
        self.pending: deque[str] = deque()  # the faults the next calls get, in order
        self.done: Counter = Counter()  # faults delivered, by kind
        self.calls = 0
        self._runner = self._session = None
        self._one_slot: asyncio.Semaphore | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, mode: str) -> str:
        """The base URL whose every call gets ``mode`` (a fault of ``CALL_FAULTS``, or slow)."""
        if mode not in (*CALL_FAULTS, "slow"):
            raise ConfigError("mode", mode, ", ".join((*CALL_FAULTS, "slow")))
        return f"{self.url}/{mode}"

    def burst(self, kind: str, calls: int) -> None:
        if kind not in CALL_FAULTS:
            raise ConfigError("kind", kind, ", ".join(CALL_FAULTS))
        self.pending.extend([kind] * calls)

    async def start(self) -> "ChaosProxy":
        import aiohttp
        from aiohttp import web

        if self.upstream:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5))
        self._one_slot = asyncio.Semaphore(1)
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    def start_in_thread(self) -> "ChaosProxy":
        """Serve from a loop of its own in a daemon thread (for callers without a loop)."""
        import threading

        loop, ready = asyncio.new_event_loop(), threading.Event()

        def serve():
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request):
        from aiohttp import ClientError, web

        first, _, rest = request.path.lstrip("/").partition("/")
        mode, path = (first, "/" + rest) if first in (*CALL_FAULTS, "slow") else (None, request.path)
        fault = mode if mode in CALL_FAULTS else None
        if path.endswith("/completions"):
            self.calls += 1
            fault = fault or (self.pending.popleft() if self.pending else None)
            if fault in ("http503", "http429"):
                self.done[fault] += 1
                return web.json_response({"error": {"message": f"chaos: {fault}"}}, status=int(fault[4:]),
                                         headers={"Retry-After": self.retry_after})
        if self.upstream is None:
            if path.endswith("/models"):
                return web.json_response({"data": [{"id": "model"}]})
            return await self._answer(request, fault, slow=mode == "slow")
        try:
            async with self._session.request(request.method, self.upstream + path + (
                    f"?{request.query_string}" if request.query_string else ""),
                    data=await request.read(), headers=_forwarded(request.headers)) as up:
                if not up.content_type.startswith("text/event-stream"):
                    return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)
                return await self._relay(request, up.content, fault, up.status)
        except (ClientError, asyncio.TimeoutError) as err:
            return web.json_response({"error": {"message": f"upstream: {type(err).__name__}"}}, status=502)

    async def _answer(self, request, fault: str | None, slow: bool):
        """The stand-in engine's stream: words, the last with a finish reason, then [DONE]."""
        max_tokens = (await request.json()).get("max_tokens") or self.tokens
        first_s, gap_s, words = self.slow if slow else (0.0, 0.0, self.tokens)
        n = max(1, min(words, int(max_tokens)))

        def event(i: int) -> bytes:
            body = {"choices": [{"index": 0, "delta": {"content": f" word{i}"}, "token_ids": [1],
                                 "finish_reason": "length" if i == n - 1 else None}]}
            return f"data: {json.dumps(body)}\n\n".encode()

        async def lines():
            async with self._one_slot if slow else contextlib.nullcontext():  # a queue before the first token
                await asyncio.sleep(first_s)
                for i in range(n):
                    if i:
                        await asyncio.sleep(gap_s)
                    yield event(i)
                yield b"data: [DONE]\n\n"
        return await self._relay(request, lines(), fault, 200)

    async def _relay(self, request, lines, fault: str | None, status: int):
        """Write an event stream, hurt as ``fault`` says (cut, stall, malformed, truncated)."""
        from aiohttp import web

        resp = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events, hurt_after = 0, self.cut_after if fault == "cut" else 2
        async for line in lines:
            await resp.write(line)
            events += line.startswith(b"data:")
            if fault in ("cut", "stall", "malformed", "truncated") and events >= hurt_after:
                self.done[fault] += 1
                if fault == "cut":
                    request.transport.close()  # the connection dies mid-stream: no [DONE], no clean end
                elif fault == "stall":
                    await asyncio.sleep(3600)  # alive, silent: until the caller gives up
                elif fault == "malformed":
                    await resp.write(b"data: {this is not json\n\n")
                return resp  # truncated: ends without a finish reason or [DONE]
        await resp.write_eof()
        return resp


def _forwarded(headers) -> dict:
    return {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization", "accept")}


def engine_core_processes() -> list[int]:
    """The vLLM engine-core processes of this process (an in-process engine's core and
    workers; a server started by ``VLLMServer`` runs in a session of its own)."""
    import psutil

    group = os.getpgrp()
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("VLLM::") and os.getpgid(p.pid) == group:
                found.append(p.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@dataclass
class FaultRecord:
    """What happened to one fault of the plan."""

    at_s: float
    kind: str
    target: str
    injected: bool
    duration_s: float = 0.0  # a freeze's length; a kill's time until the server answered again
    calls: int = 0
    note: str = ""


class ProcessFaults:
    """Injects a plan (``draw_faults``) into running servers, one proxy and the
    aggregator's engine core, and logs each fault (``records``). Servers are ``up``,
    ``down`` (killed, starting again) or ``frozen``; a kill or a freeze picks among
    those up, and is skipped (logged as such) when none is up or ``max_out`` servers
    are out already (None: no limit)."""

    def __init__(self, servers: Mapping[str, VLLMServer], proxy: ChaosProxy | None = None,
                 proxied: str = "", aggregator_pids=engine_core_processes, max_out: int | None = None):
        self.servers = dict(servers)
        self.state = {name: "up" for name in self.servers}
        self.proxy, self.proxied = proxy, proxied
        self.aggregator_pids = aggregator_pids
        self.max_out = max_out
        self.records: list[FaultRecord] = []
        self.frozen: dict[str, list[int]] = {}  # target -> the process groups or pids it froze
        self.restarts: set[asyncio.Task] = set()  # servers starting again after a kill
        self.thaws: set[asyncio.Task] = set()  # freezes waiting for their end
        self.stopping = False
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self, plan: list[Fault]) -> None:
        """Inject ``plan`` at its moments (from ``t0``); cancelled when the run ends."""
        for fault in sorted(plan, key=lambda f: f.at_s):
            await asyncio.sleep(max(0.0, fault.at_s - self.now()))
            self.inject(fault)

    def inject(self, fault: Fault) -> FaultRecord:
        if fault.kind in PROXY_KINDS:
            rec = self._burst(fault)
        elif fault.kind == AGGREGATOR_FREEZE:
            rec = self._freeze("aggregator", self.aggregator_pids(), fault)
        else:
            up = sorted(name for name, s in self.state.items() if s == "up")
            out = len(self.state) - len(up)
            if not up or (self.max_out is not None and out >= self.max_out):
                why = "no proposer server up" if not up else f"{out} proposer server(s) out already (at most {self.max_out})"
                rec = FaultRecord(round(self.now(), 3), fault.kind, "", False, note=why)
            else:
                target = up[int(fault.pick * len(up))]
                rec = self._kill(target) if fault.kind == "kill" else self._freeze(
                    target, [-self.servers[target].proc.pid], fault)
        self.records.append(rec)
        return rec

    def _burst(self, fault: Fault) -> FaultRecord:
        if self.proxy is None:
            return FaultRecord(round(self.now(), 3), fault.kind, "", False, note="no proxy")
        self.proxy.burst(fault.kind, fault.calls)
        return FaultRecord(round(self.now(), 3), fault.kind, self.proxied, True, calls=fault.calls)

    def _kill(self, target: str) -> FaultRecord:
        server = self.servers[target]
        rec = FaultRecord(round(self.now(), 3), "kill", target, True)
        server.kill()
        self.state[target] = "down"
        self._spawn(self._restart(target, rec), self.restarts)
        return rec

    async def _restart(self, target: str, rec: FaultRecord) -> None:
        t = time.monotonic()
        try:
            await asyncio.to_thread(self.servers[target].start)
            self.state[target] = "up"
            rec.duration_s = round(time.monotonic() - t, 3)
        except Exception as err:  # it stays down: the run goes on without it
            rec.note = "still starting when the run ended" if self.stopping else f"did not start again: {err}"

    def _freeze(self, target: str, pids: list[int], fault: Fault) -> FaultRecord:
        """SIGSTOP ``pids`` (a negative pid: a process group) for ``fault.duration_s``."""
        if not pids:
            return FaultRecord(round(self.now(), 3), fault.kind, target, False, note="no process to freeze")
        _signal(pids, signal.SIGSTOP)
        self.frozen[target] = pids
        if target in self.state:
            self.state[target] = "frozen"
        self._spawn(self._thaw_later(target, fault.duration_s), self.thaws)
        return FaultRecord(round(self.now(), 3), fault.kind, target, True, duration_s=fault.duration_s)

    async def _thaw_later(self, target: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.thaw(target)

    def thaw(self, target: str) -> None:
        _signal(self.frozen.pop(target, []), signal.SIGCONT)
        if self.state.get(target) == "frozen":
            self.state[target] = "up"

    @staticmethod
    def _spawn(coro, tasks: set) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def stop(self) -> None:
        """Thaw everything frozen; a server still starting again is stopped (its
        record says so), the others are left running for their owner to stop."""
        self.stopping = True
        for task in list(self.thaws):
            task.cancel()
        for target in list(self.frozen):
            self.thaw(target)
        for name, state in self.state.items():
            if state == "down":
                await asyncio.to_thread(self.servers[name].stop)
        await asyncio.gather(*self.thaws, *self.restarts, return_exceptions=True)

    def table(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.killpg(-pid, sig) if pid < 0 else os.kill(pid, sig)
        except ProcessLookupError:
            pass
