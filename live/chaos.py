"""Faults at random moments, for chaos runs (``benchmarks/chaos.py``).

Three ways to hurt a deployment, all on 127.0.0.1 and all undone at the end:

- ``ChaosProxy``: a small proxy in front of one OpenAI-compatible server that answers
  the next calls with bursts of 503 or 429, or cuts their streams off after a few
  events (the connection closed mid-stream);
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


class ChaosProxy:
    """127.0.0.1:<port> in front of ``upstream``: completions pass through streamed,
    except the calls that a burst (``burst``) takes: a 503 or a 429 answer, or a stream
    cut off after ``cut_after`` events. An upstream that does not answer is a 502."""

    def __init__(self, upstream: str, cut_after: int = 3):
        self.upstream = upstream.rstrip("/")
        self.cut_after = cut_after
        self.port = free_port()
        self.pending: deque[str] = deque()  # the faults the next calls get, in order
        self.done: Counter = Counter()  # faults delivered, by kind
        self.calls = 0
        self._runner = self._session = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def burst(self, kind: str, calls: int) -> None:
        if kind not in PROXY_KINDS:
            raise ConfigError("kind", kind, ", ".join(PROXY_KINDS))
        self.pending.extend([kind] * calls)

    async def start(self) -> "ChaosProxy":
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request):
        from aiohttp import ClientError, web

        fault = None
        if request.path.endswith("/completions"):
            self.calls += 1
            fault = self.pending.popleft() if self.pending else None
            if fault in ("http503", "http429"):
                self.done[fault] += 1
                return web.json_response({"error": {"message": f"chaos: {fault}"}}, status=int(fault[4:]))
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs,
                                             data=await request.read(), headers=_forwarded(request.headers)) as up:
                if not up.content_type.startswith("text/event-stream"):
                    return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)
                return await self._stream(request, up, cut=fault == "cut")
        except (ClientError, asyncio.TimeoutError) as err:
            return web.json_response({"error": {"message": f"upstream: {type(err).__name__}"}}, status=502)

    async def _stream(self, request, up, cut: bool):
        from aiohttp import web

        resp = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = 0
        async for line in up.content:
            await resp.write(line)
            events += line.startswith(b"data:")
            if cut and events >= self.cut_after:
                self.done["cut"] += 1
                request.transport.close()  # the connection dies mid-stream: no [DONE], no clean end
                return resp
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
