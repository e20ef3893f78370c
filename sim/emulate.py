"""Emulated engines: the simulator's engine model in real time behind the OpenAI API.

``staircase emulate`` serves a fleet of OpenAI-compatible engines from one process on
loopback, one path per engine (``http://127.0.0.1:8100/<engine>/v1/...``), whose timing
is the engine profile's, in real time: every engine is a ``staircase.sim.engine.SimEngine``
(continuous batching, whole or chunked prefill, the prefix cache, the KV limit) on one
SimPy clock that follows the wall clock. A call's tokens are written when the model says
they are made (one server-sent event per ``stream_interval`` tokens, as vLLM's
``--stream-interval``), with usage on every event when ``continuous_usage_stats`` is asked
(vLLM's extension) and in the final usage chunk; a client that goes away aborts its call.

It is for load tests and chaos at GPU speed without GPUs (a gateway's own cost, routers,
faults), not for fidelity: there is no model. Tokens are whitespace-separated words (the
prompt's length in words is its length in tokens), the answer is ``max_tokens`` words
(``stop`` and end-of-sequence never end it early), the prefix cache is keyed by a prompt's
first words (a staircase call's later steps hit the cache as on vLLM; unrelated prompts with
the same first 32 words would share a key).

Every call's timing is kept (``calls``; ``GET /emulator/calls``, and the CSV written at the
end): when it arrived, was admitted, when its first and last tokens were due and written,
its prompt, cached and output tokens, the ``X-Request-Id`` header it came with. A benchmark
subtracts these from its own client's times to tell the engines' share of a latency from
the gateway's. ``/metrics`` gives vLLM's metric names per engine (``engine`` label).
"""

from __future__ import annotations

import asyncio
import csv
from array import array
import itertools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import simpy

from staircase.driver import RequestDriver
from staircase.errors import ConfigError

from .engine import SimCall, SimEngine
from .profile import EngineModel, Profile

KEY_WORDS = 32  # a prompt's first words key its prefix-cache entry
PROMPTS_KEPT = 4096
WORD = "x"  # every token of every answer  # prompts an engine remembers to compute a new prompt's common prefix


class _Generate:
    """What ``SimCall`` reads of a call: its answer budget and where its chunks end."""

    __slots__ = ("max_tokens", "boundaries")

    def __init__(self, max_tokens: int, interval: int):
        self.max_tokens = max_tokens
        self.boundaries = (*range(interval, max_tokens, interval), max_tokens)


@dataclass
class CallTiming:
    """One call's timing on the emulator's clock (``time.monotonic()`` seconds: the same
    clock as any other process's on this machine)."""

    call: int
    engine: str
    request_id: str
    arrived_s: float
    admitted_s: float = math.nan
    first_due_s: float = math.nan  # when the model makes the first token
    first_sent_s: float = math.nan  # when it was written to the socket
    last_due_s: float = math.nan
    last_sent_s: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    outcome: str = "running"  # ok, aborted
    writes: array | None = None  # with ``record_writes``: per write, its time and the tokens so far, flat


class _Call(RequestDriver):
    """A call in flight: the SimEngine reports to it, its driver (a ``RequestDriver``,
    whose type the compiled engine asks for, with no request behind it), and the HTTP
    handler writes what it holds."""

    __slots__ = ("timing", "sim", "pending", "waiter", "done", "clock", "key", "words")

    def __init__(self, timing: CallTiming, clock: "Clock"):
        self.timing, self.clock = timing, clock
        self.sim: SimCall | None = None
        self.key, self.words = None, []
        self.pending: list[tuple[int, float]] = []  # (tokens, when due), not written yet
        self.waiter: asyncio.Future | None = None
        self.done = False

    async def next_tokens(self) -> list[tuple[int, float]]:
        """What the call made since the last ask, as (tokens, when due); empty once it is done."""
        while not self.pending and not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.pending = self.pending, []
        return items

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # the SimEngine's driver interface
    def admitted(self, call, prompt_tokens: int, cached: int) -> None:
        self.timing.admitted_s = self.clock.wall(self.clock.env.now)
        self.timing.cached_tokens = int(cached)

    def chunk(self, call, tokens: int, text, first_s: float, now: float) -> None:
        self.pending.append((int(tokens), self.clock.wall(now)))
        self._wake()

    def finished(self, call, reason: str, now: float) -> None:
        self.done = True
        self._wake()

    def failed(self, call, why: str, now: float) -> None:  # (no faults are injected here)
        self.finished(call, why, now)


class Clock:
    """One SimPy environment for every engine, kept level with the wall clock: its time
    ``t`` is ``t0 + t`` on ``time.monotonic()``. ``sync`` runs every event due by now;
    ``arm`` asks the loop to run ``sync`` when the next event is due, but at most once per
    ``resolution_s``: events due within one tick run together, up to that late (a fleet's
    hundreds of calls each on its own phase would otherwise wake the loop per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution_s: float = 0.001):
        self.loop, self.env = loop, simpy.Environment()
        self.t0 = time.monotonic()
        self.resolution_s = resolution_s
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the armed tick runs (clock time)
        self._last = -math.inf  # when the last tick ran
        self.lag_s_max = 0.0  # the latest an event ran after it was due
        self.ticks = 0

    def wall(self, t: float) -> float:
        return self.t0 + t

    def sync(self) -> None:
        now = time.monotonic() - self.t0
        if now > self.env.now:
            due = self.env.peek()
            if due < now and now - due > self.lag_s_max:
                self.lag_s_max = now - due
            self.env.run(until=now)

    def arm(self) -> None:
        due = max(self.env.peek(), self._last + self.resolution_s)
        if due >= self._at:  # the armed tick comes first and arms the next
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = due
        self._handle = self.loop.call_later(max(0.0, self.t0 + due - time.monotonic()), self._tick)

    def _tick(self) -> None:
        self._handle, self._at = None, math.inf
        self.ticks += 1
        self.sync()
        self._last = self.env.now
        if self.env.peek() < math.inf:
            self.arm()


class EmulatedEngine:
    """One engine of the fleet: a ``SimEngine`` and what it remembers of prompts."""

    def __init__(self, name: str, model: EngineModel, clock: Clock, rng: np.random.Generator, noise: bool):
        self.name, self.model, self.clock = name, model, clock
        self.sim = SimEngine(clock.env, name, model, rng, noise=noise)
        self.prompts: OrderedDict = OrderedDict()  # key -> the words of the key's last prompt
        self.prompt_tokens = self.generation_tokens = self.cache_queries = self.cache_hits = 0
        self.requests_ok = self.requests_aborted = 0

    def _reuse(self, words: list[str]) -> tuple[object, int]:
        """(cache key, tokens this prompt shares with the key's last prompt)."""
        key = hash(tuple(words[:KEY_WORDS]))
        last = self.prompts.pop(key, None)
        shared = 0
        if last is not None:
            for a, b in zip(last, words):
                if a != b:
                    break
                shared += 1
        self.prompts[key] = words
        if len(self.prompts) > PROMPTS_KEPT:
            self.prompts.popitem(last=False)
        return key, shared

    def submit(self, call: _Call, words: list[str], max_tokens: int, interval: int) -> None:
        key, shared = self._reuse(words)
        call.key, call.words = key, words
        n = max(1, len(words))
        call.timing.prompt_tokens = n
        # the key is also the shared prefix's: a prompt another call of the same key was admitted with is
        # (to its common part) in the cache at once, as vLLM's blocks are once computed
        call.sim = SimCall(call, _Generate(max_tokens, interval), None, 0, key, n, shared, shared, key, max_tokens)
        self.clock.sync()
        self.sim.submit(call.sim)
        self.clock.arm()

    def abort(self, call: _Call) -> None:
        if call.sim is not None and not call.done:
            self.clock.sync()
            self.sim.cancel(call.sim)
            self.clock.arm()

    def ended(self, call: _Call) -> None:
        """Count the call; its key remembers its prompt and answer (what a next step reuses)."""
        t = call.timing
        if call.key in self.prompts:
            self.prompts[call.key] = call.words + [WORD] * t.output_tokens
        self.prompt_tokens += t.prompt_tokens
        self.generation_tokens += t.output_tokens
        self.cache_queries += t.prompt_tokens
        self.cache_hits += t.cached_tokens
        if t.outcome == "ok":
            self.requests_ok += 1
        else:
            self.requests_aborted += 1


def fleet_models(profile: Profile, deployment=None, replicas: int = 1) -> dict[str, EngineModel]:
    """The fleet's engines by name: a deployment's replicas (``<pool>/<i>``, each its pool's
    model from the profile), else ``replicas`` of every engine of the profile
    (``<engine>/<i>``)."""
    if deployment is not None:
        return {f"{pool.name}/{i}": profile.engines[pool.model]
                for pool in deployment.pools.values() for i in range(pool.replicas)}
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError("replicas", replicas, "an integer >= 1")
    return {f"{name}/{i}": model for name, model in profile.engines.items() for i in range(replicas)}


def write_calls(path: Path, calls: list[CallTiming]) -> None:
    names = [f.name for f in fields(CallTiming) if f.name != "writes"]
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for c in calls:
            w.writerow([getattr(c, n) for n in names])
    tmp.replace(path)


class Fleet:
    """The engines of one emulator process and the record of their calls."""

    def __init__(self, models: dict[str, EngineModel], clock: Clock, seed: int = 0, noise: bool = True,
                 stream_interval: int = 1, record_writes: bool = False):
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
            raise ConfigError("stream-interval", stream_interval, "an integer >= 1 (tokens per streamed event)")
        rngs = np.random.default_rng(seed).spawn(len(models))
        self.engines = {name: EmulatedEngine(name, m, clock, rng, noise)
                        for (name, m), rng in zip(models.items(), rngs)}
        self.clock, self.stream_interval, self.record_writes = clock, stream_interval, record_writes
        self.calls: list[CallTiming] = []
        self.ids = itertools.count()

    def open_call(self, engine: str, request_id: str) -> _Call:
        timing = CallTiming(next(self.ids), engine, request_id, time.monotonic(),
                            writes=array("d") if self.record_writes else None)
        self.calls.append(timing)
        return _Call(timing, self.clock)


def client_config(fleet: dict[str, EngineModel], base_url: str, profile: Profile, deployment=None) -> tuple[dict, dict]:
    """(engines config, deployment) for ``staircase live``/``serve`` (``--config``,
    ``--deployment``) on this fleet: one ``http`` engine per pool, with one URL per
    replica; the pools the deployment given has (each now of its own engine), or one
    pool per profile engine with the profile's slots."""
    pools: dict[str, list[str]] = {}
    for name in fleet:
        pools.setdefault(name.rpartition("/")[0], []).append(f"{base_url}/{name}")
    engines = {p: {"kind": "http", "url": urls if len(urls) > 1 else urls[0],
                   "model": fleet[f"{p}/0"].name} for p, urls in pools.items()}
    if deployment is not None:
        raw = dict(deployment.raw or deployment.to_dict())
        raw["pools"] = {p: dict(spec, model=p) for p, spec in raw["pools"].items()}
        return {"engines": engines}, raw
    slots = {"proposers": list(profile.proposer_engines), "aggregator": profile.aggregator_engine}
    raw = {"schema": "staircase-deployment/1",
           "pools": {p: {"model": p, "replicas": len(urls), "router": "least-loaded"} for p, urls in pools.items()},
           "slots": slots}
    return {"engines": engines}, raw
