"""The live runner: the shared scheduler on real engines, with wall-clock times.

Each request runs its own ``Scheduler``; ``Generate`` actions become streaming calls
whose deltas are grouped into the scheduler's chunks (a chunk ends at the first
delta that reaches its boundary), ``Cancel`` aborts the call on the engine,
``SetTimer`` becomes ``loop.call_later``. Engine errors (a dead server, an engine
silent past what its work explains (``live.watchdog``), HTTP 429/5xx, a malformed or
truncated stream) become ``Failed`` events, so the scheduler decides: at most r lost inputs and the aggregator goes on
from the others, more and the request ends with an error naming them. Rows are
kept as requests finish, so an interrupted run keeps its finished requests.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import zlib
from dataclasses import replace
from typing import Mapping, Sequence

from staircase.errors import ConfigError
from staircase.metrics import request_metrics
from staircase.progress import progress as progress_bar
from staircase.policy import Policy
from staircase.scheduler import (Cancel, Chunk, Done, Emit, Failed, Finished, Generate, Query, Scheduler,
                                 SetTimer, TimerFired)
from staircase.topology import Topology
from staircase.trace import CHUNK_COLUMNS, REQUEST_COLUMNS, Trace, frame

from .engines import Engine, EngineError, Sampling
from .watchdog import CallWatch, EnginePace, StallLimits


class _Tokens:
    """The scheduler's tokenizer interface over an engine's tokenizer."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def count(self, text: str) -> int:
        return self.engine.count_tokens(text)


class LiveRunner:
    def __init__(self, engines: Mapping[str, Engine], topology: Topology, *, max_tokens: int = 256,
                 sampling: Sampling | None = None, stall: StallLimits | None = None,
                 request_timeout_s: float | None = 600.0):
        """``engines`` maps topology slots (``proposer-<i>``, ``aggregator``) to engines;
        several slots may share one engine. ``stall``: when a silent call is lost
        (default: limits that follow each engine's observed pace, ``live.watchdog``);
        ``request_timeout_s``: a request's whole budget (None: none)."""
        missing = sorted({n.slot for n in topology.nodes} - set(engines))
        if missing:
            raise ConfigError("engines", sorted(engines), f"an engine for every slot (missing {', '.join(missing)})")
        self.engines = dict(engines)
        self.topology = topology
        self.max_tokens = max_tokens
        self.sampling = sampling or Sampling()
        self.stall = stall or StallLimits()
        self.paces = {id(e): EnginePace(self.stall) for e in self.engines.values()}
        if request_timeout_s is not None and not request_timeout_s > 0:
            raise ConfigError("request_timeout_s", request_timeout_s, "a number of seconds > 0, or None for no limit")
        self.request_timeout_s = request_timeout_s
        self.tokens = _Tokens(self.engines["aggregator"])
        self.request_rows: list[tuple] = []
        self.chunk_rows: list[tuple] = []
        self._ids = itertools.count()
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    async def start(self) -> None:
        for engine in {id(e): e for e in self.engines.values()}.values():
            await engine.start()

    async def close(self) -> None:
        for engine in {id(e): e for e in self.engines.values()}.values():
            await engine.close()

    # ------------------------------------------------------------------ runs
    async def run_policy(self, policy: Policy, queries: Sequence[str], *, concurrency: int = 1,
                         rate_per_s: float | None = None, seed: int = 0, progress: bool | None = None,
                         reset_cache: bool = True) -> Trace:
        """All queries under one policy: closed loop with ``concurrency`` users, or open
        loop with Poisson arrivals at ``rate_per_s``. The prefix cache is emptied first
        unless ``reset_cache=False`` (calibration probes of cache hits)."""
        policy.validate_for(self.topology)
        first_row = len(self.request_rows), len(self.chunk_rows)
        if reset_cache:
            for engine in {id(e): e for e in self.engines.values()}.values():
                await engine.reset_cache()
        self._t0 = time.perf_counter()
        bar = progress_bar(len(queries), f"live {policy.name}", progress)
        if rate_per_s:
            rng = random.Random(seed)
            arrivals = list(itertools.accumulate([0.0] + [rng.expovariate(rate_per_s) for _ in queries[1:]]))

            async def open_loop(i: int, q: str):
                await asyncio.sleep(max(0.0, arrivals[i] - self.now()))
                await self.run_request(policy, i, q)
                bar.update(1)
            await asyncio.gather(*(open_loop(i, q) for i, q in enumerate(queries)))
        else:
            sem = asyncio.Semaphore(concurrency)

            async def closed_loop(i: int, q: str):
                async with sem:
                    await self.run_request(policy, i, q)
                    bar.update(1)
            await asyncio.gather(*(closed_loop(i, q) for i, q in enumerate(queries)))
        bar.close()
        return self.trace(policy.name, *first_row)

    def trace(self, policy_name: str, first_request_row: int = 0, first_chunk_row: int = 0) -> Trace:
        reqs = [r for r in self.request_rows[first_request_row:] if r[1] == policy_name]
        chunks = [c for c in self.chunk_rows[first_chunk_row:] if c[1] == policy_name]
        return Trace(policy_name, frame(reqs, REQUEST_COLUMNS).sort_values("request_id").reset_index(drop=True),
                     frame(chunks, CHUNK_COLUMNS), {"policy": policy_name, "engine_models": self.engine_models()})

    def engine_models(self) -> dict[str, str]:
        """engine name -> model id, for every engine of this runner."""
        return {e.name: e.model_id for e in self.engines.values()}

    # --------------------------------------------------------------- one request
    async def run_request(self, policy: Policy, request_id: int, query: str) -> dict:
        arrival = self.now()
        sched = Scheduler(self.topology, policy, Query(query, self.tokens.count(query)), self.max_tokens,
                          tokenizer=self.tokens)
        queue: asyncio.Queue = asyncio.Queue()
        calls: dict[str, asyncio.Task] = {}  # node -> its running call
        user: list[tuple[int, float, float]] = []
        totals = {"prompt": 0, "cached": 0, "calls": 0}
        chunks: list[tuple] = []
        done: Done | None = None
        loop = asyncio.get_running_loop()
        tag = f"{policy.name}-{request_id}-{next(self._ids)}"

        def apply(actions) -> None:
            nonlocal done
            for a in actions:
                if isinstance(a, Generate):
                    key = f"{tag}-{a.node}-{a.call}"
                    calls[a.node] = asyncio.create_task(
                        self._call(a, key, queue, policy.name, request_id, totals, chunks))
                    totals["calls"] += 1
                elif isinstance(a, Cancel):
                    task = calls.pop(a.node, None)
                    if task is not None:
                        task.cancel()
                elif isinstance(a, SetTimer):
                    loop.call_later(a.delay_s, queue.put_nowait, (TimerFired(a.key), None))
                elif isinstance(a, Emit):
                    pass  # user-visible chunks are recorded with their times below
                elif isinstance(a, Done):
                    done = a

        try:
            apply(sched.start(self.now()))
            deadline = arrival + (self.request_timeout_s or float("inf"))
            while done is None:
                try:
                    timeout = None if self.request_timeout_s is None else max(0.01, deadline - self.now())
                    event, row = await asyncio.wait_for(queue.get(), timeout=timeout)
                except asyncio.TimeoutError:
                    done = Done("error", f"request timed out after {self.request_timeout_s:g}s", dict(sched.lost))
                    break
                if row is not None and sched.topology.by_id[row[2]].is_final and isinstance(event, Chunk):
                    user.append((row[8], row[12], row[13]))
                apply(sched.on(event, self.now()))
        finally:
            for task in calls.values():
                task.cancel()
            await asyncio.gather(*calls.values(), return_exceptions=True)
        m = request_metrics(user, arrival)
        lost = "; ".join(f"{k}: {v}" for k, v in sorted(done.lost.items()))
        row = (request_id, policy.name, arrival, sched.query.tokens, done.outcome, done.error or "", lost,
               m["ttft_s"], m["e2e_s"], m["tpot_s"], m["output_tokens"], m["output_tokens_per_s"],
               m["longest_stall_s"], m["stalls_over_threshold"], totals["calls"], totals["prompt"], totals["cached"])
        self.request_rows.append(row)
        self.chunk_rows.extend(chunks)
        return dict(zip(REQUEST_COLUMNS, row)) | {"output_text": sched.output_text()}

    async def _call(self, g: Generate, key: str, queue: asyncio.Queue, policy_name: str, request_id: int,
                    totals: dict, chunks: list) -> None:
        node = self.topology.by_id[g.node]  # a policy's plan only keeps or drops nodes
        engine = self.engines[node.slot]
        sent = self.now()
        produced = 0
        bound_i = 0
        index = g.first_chunk_index
        text: list[str] = []
        chunk_tokens = 0
        first_s = None
        chunk_start_s = sent
        prompt_tokens = cached = 0
        finish = None
        first_of_call = True
        sampling = self.sampling
        if sampling.seed is not None:  # distinct but reproducible streams per request and node
            sampling = replace(sampling, seed=(sampling.seed * 1_000_003 + zlib.crc32(f"{request_id}/{g.node}".encode())) % 2**31)
        stream = engine.stream(key, g.prompt, g.max_tokens, sampling)
        watch = CallWatch(self.paces[id(engine)], g.prompt.tokens, final=node.is_final, healthy=engine.healthy)

        def flush(end_s: float) -> None:
            nonlocal index, text, chunk_tokens, first_s, chunk_start_s, first_of_call
            row = (request_id, policy_name, g.node, node.role, node.stage, engine.name, g.call, index, chunk_tokens,
                   prompt_tokens if first_of_call else 0, cached if first_of_call else 0, chunk_start_s,
                   first_s, end_s, node.is_final)
            chunks.append(row)
            queue.put_nowait((Chunk(g.node, g.call, index, chunk_tokens, "".join(text)), row))
            index += 1
            text, chunk_tokens, first_s, chunk_start_s, first_of_call = [], 0, None, end_s, False

        try:
            while True:
                try:
                    delta = await watch.next(stream)
                except StopAsyncIteration:
                    break
                watch.on_delta(delta.tokens, delta.prompt_tokens)
                t = self.now()
                if delta.prompt_tokens is not None:
                    prompt_tokens, cached = delta.prompt_tokens, delta.cached_tokens or 0
                    totals["prompt"] += prompt_tokens
                    totals["cached"] += cached
                if delta.tokens:
                    if first_s is None:
                        first_s = t
                    text.append(delta.text)
                    chunk_tokens += delta.tokens
                    produced += delta.tokens
                    if bound_i < len(g.boundaries) and produced >= g.boundaries[bound_i]:
                        while bound_i < len(g.boundaries) and produced >= g.boundaries[bound_i]:
                            bound_i += 1
                        flush(t)
                if delta.finish_reason:
                    finish = delta.finish_reason
            if chunk_tokens:
                flush(self.now())
            queue.put_nowait((Finished(g.node, g.call, finish or "stop"), None))
        except EngineError as err:
            queue.put_nowait((Failed(g.node, g.call, err.reason), None))
        except asyncio.CancelledError:
            await engine.abort(key)
            raise
        finally:
            watch.close()
            await stream.aclose()
