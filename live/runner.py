"""The live runner: the shared request driver on real engines, with wall-clock times.

Each request runs its own ``RequestDriver`` (``staircase.driver``) on a ``_LivePort``:
a ``Generate`` becomes one asyncio task streaming from the slot's engine, its deltas
grouped into the scheduler's chunks (a chunk ends at the first delta that reaches its
boundary, ``_Chunker``); a cancel aborts the call on the engine; timers are
``loop.call_later``. Engine errors (a dead server, an engine silent past what its
work explains (``staircase.live.watchdog``), HTTP 429/5xx, a malformed or truncated stream)
are reported as failures, so the scheduler decides: at most r lost inputs and the
aggregator goes on from the others, more and the request ends with an error naming
them. The driver records rows as requests finish (texts and prompt ids included),
so an interrupted run keeps its finished requests.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
import zlib
from dataclasses import replace
from typing import Mapping, Sequence

from staircase.deployment import Deployment, Placement
from staircase.driver import CallRecord, Recorder, RequestDriver
from staircase.errors import ConfigError
from staircase.policies import Policy
from staircase.progress import progress as progress_bar
from staircase.scheduler import Generate, Query
from staircase.workload import Workload, arrival_times
from staircase.topology import Node, Topology, proposer_slot_index
from staircase.trace import RequestRow, Trace

from .engines import Engine, EngineError, Sampling
from .watchdog import CallWatch, EnginePace, StallLimits


class Replica:
    """The runner's view of one engine for routers and policies: calls in flight, and
    the KV tokens they hold (prompt + tokens streamed so far, counted by the runner)."""

    __slots__ = ("engine", "name", "in_flight", "kv_tokens")

    def __init__(self, engine: Engine):
        self.engine, self.name = engine, engine.name
        self.in_flight = self.kv_tokens = 0


def slot_pools(engines: Mapping[str, Engine]) -> tuple[Deployment, dict[str, list[Engine]]]:
    """Slots mapped to engines as a deployment: a pool of one per engine, named after it
    (``name#2``, ... where distinct engines share a name)."""
    names: dict[int, str] = {}
    for e in engines.values():
        if id(e) not in names:
            taken = set(names.values())
            names[id(e)] = e.name if e.name not in taken else next(
                f"{e.name}#{k}" for k in itertools.count(2) if f"{e.name}#{k}" not in taken)
    width = 1 + max((proposer_slot_index(s) or 0 for s in engines), default=0)
    aggregator = names[id(engines["aggregator"])]
    proposers = [names[id(engines[f"proposer-{i}"])] if f"proposer-{i}" in engines else aggregator
                 for i in range(width)]
    by_id = {id(e): e for e in engines.values()}
    return Deployment.of_slots(proposers, aggregator), {name: [by_id[i]] for i, name in names.items()}


class LiveRunner:
    def __init__(self, engines: Mapping[str, Engine], topology: Topology, *, max_tokens: int = 256,
                 sampling: Sampling | None = None, stall: StallLimits | None = None,
                 request_timeout_s: float | None = 600.0, deployment: Deployment | None = None,
                 pools: Mapping[str, Sequence[Engine]] | None = None, seed: int = 0):
        """``engines`` maps topology slots (``proposer-<i>``, ``aggregator``) to engines;
        several slots may share one engine. ``deployment`` with ``pools`` (pool name ->
        its replicas, ``staircase.live.engines.EngineSet``): every call goes to the replica its
        slot pool's router picks (routers seeded with ``seed``). ``stall``: when a silent
        call is lost (default: limits that follow each engine's observed pace,
        ``staircase.live.watchdog``); ``request_timeout_s``: a request's whole budget (None: none)."""
        missing = sorted({n.slot for n in topology.nodes} - set(engines))
        if missing:
            raise ConfigError("engines", sorted(engines), f"an engine for every slot (missing {', '.join(missing)})")
        self.engines = dict(engines)
        self.topology = topology
        self.max_tokens = max_tokens
        self.sampling = sampling or Sampling()
        self.final_seed: int | None = None  # the final node's run seed instead of sampling.seed
        self.stall = stall or StallLimits()
        if deployment is None or pools is None:
            deployment, pools = slot_pools({n.slot: self.engines[n.slot] for n in topology.nodes})
        self.replicas = {id(e): Replica(e) for group in pools.values() for e in group}
        self.placement = Placement(deployment, {n.slot for n in topology.nodes},
                                   {name: [self.replicas[id(e)] for e in group] for name, group in pools.items()}, seed)
        self.all_engines = [r.engine for r in self.replicas.values()]
        self.paces = {i: EnginePace(self.stall) for i in self.replicas}
        if request_timeout_s is not None and not request_timeout_s > 0:
            raise ConfigError("request_timeout_s", request_timeout_s, "a number of seconds > 0, or None for no limit")
        self.request_timeout_s = request_timeout_s
        self.tokens = self.engines["aggregator"]  # counts prompts with its tokenizer (Engine.count)
        self.recorder = Recorder()
        self._ids = itertools.count()
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def set_epoch(self, t0: float) -> None:
        """Count time from ``t0`` (a ``time.perf_counter()`` value: one clock for every
        process of the machine), as ``staircase serve --workers`` does in each worker."""
        self._t0 = t0

    async def start(self) -> None:
        for engine in self.all_engines:
            await engine.start()

    async def close(self) -> None:
        for engine in self.all_engines:
            await engine.close()

    # ------------------------------------------------------------------ runs
    async def run_policy(self, policy: Policy, queries: Sequence[str], *, concurrency: int = 1,
                         rate_per_s: float | None = None, seed: int = 0, progress: bool | None = None,
                         reset_cache: bool = True, prompt_ids: Sequence[str] | None = None,
                         max_tokens: int | None = None, final_max_tokens: int | None = None,
                         arrivals: Sequence[float] | None = None) -> Trace:
        """All queries under one policy: closed loop with ``concurrency`` users, or open
        loop with Poisson arrivals at ``rate_per_s``, or at the given ``arrivals`` (seconds
        from the start, one per query: another run's, e.g. a server's). The prefix cache
        is emptied first unless ``reset_cache=False`` (calibration probes of cache hits).
        ``prompt_ids`` (one per query) go into the request rows; ``max_tokens`` overrides
        the runner's for this run, ``final_max_tokens`` caps the final node's answer alone."""
        if prompt_ids is not None and len(prompt_ids) != len(queries):
            raise ConfigError("prompt_ids", f"{len(prompt_ids)} ids", f"one per query ({len(queries)})")
        ids = list(prompt_ids) if prompt_ids is not None else [None] * len(queries)
        times = self._arrivals(len(queries), rate_per_s, seed, arrivals)
        policy.validate_for(self.topology)
        self.check_sessions(policy)
        first_row = len(self.recorder.requests), len(self.recorder.chunks)
        if reset_cache:
            for engine in self.all_engines:
                await engine.reset_cache()
        self._t0 = time.perf_counter()
        bar = progress_bar(len(queries), f"live {policy.name}", progress)
        sem = asyncio.Semaphore(concurrency if times is None else len(queries) or 1)

        async def one(i: int, q: str):
            if times is not None:
                await asyncio.sleep(max(0.0, times[i] - self.now()))
            async with sem:
                await self.run_request(policy, i, q, ids[i], max_tokens, final_max_tokens)
                bar.update(1)
        await asyncio.gather(*(one(i, q) for i, q in enumerate(queries)))
        bar.close()
        return self.trace(policy.name, *first_row)

    @staticmethod
    def _arrivals(n: int, rate_per_s: float | None, seed: int, given: Sequence[float] | None) -> list[float] | None:
        """Each request's arrival (seconds from the start) in an open loop; None: closed loop."""
        if given is not None:
            times = [float(t) for t in given]
            if len(times) < n or any(not (t >= 0) for t in times) or times != sorted(times):
                raise ConfigError("arrivals", f"{len(times)} times", f"at least one per request ({n}), >= 0, "
                                                                     "in order")
            return times[:n]
        return arrival_times(Workload("poisson", n, rate_per_s), seed) if rate_per_s else None

    def check_sessions(self, policy: Policy) -> None:
        """The ``session`` layout needs engines that keep sessions for every consumer slot."""
        if policy.layout != "session":
            return
        for n in self.topology.nodes:
            engine = self.engines[n.slot]
            if n.upstream and not engine.SESSIONS:
                raise ConfigError("policy", policy.name, f"engines that keep sessions open (in-process vLLM, kind "
                                  f"vllm) for every consumer; {n.slot} runs on {engine.name} ({type(engine).__name__})")

    def trace(self, policy_name: str, first_request_row: int = 0, first_chunk_row: int = 0) -> Trace:
        """The rows of one policy (from the given row positions on)."""
        meta = {"policy": policy_name, "engine_models": self.engine_models()}
        return self.recorder.trace(policy_name, meta, first_request_row, first_chunk_row)

    def engine_models(self) -> dict[str, str]:
        """engine name -> model id, for every engine of this runner."""
        return {e.name: e.model_id for e in self.all_engines}

    def engine_pools(self) -> dict[str, str]:
        """engine name -> the pool it serves in."""
        return self.placement.engine_pools()

    # --------------------------------------------------------------- one request
    async def run_request(self, policy: Policy, request_id: int, query: str, prompt_id: str | None = None,
                          max_tokens: int | None = None, final_max_tokens: int | None = None, *,
                          sampling: Sampling | None = None, listener=None) -> RequestRow:
        """One request through the shared request driver; returns its row (the answer
        text included). ``sampling``: this request's own (default: the runner's).
        ``listener`` (``staircase serve``'s): ``listener.text(text, tokens, t)`` gets each
        delta of the final node as it arrives, ``listener.ended(row)`` the request's row
        however it ended. Cancelling the task that awaits this cancels every call of the
        request on its engine; a cancel with a message (``task.cancel("client
        disconnected")``) also records the request as an error, ``cancelled: <message>``
        (one without, as Ctrl-C's, leaves no row: a run keeps its finished requests)."""
        port = _LivePort(self, f"{policy.name}-{request_id}-{next(self._ids)}", sampling or self.sampling, listener)
        driver = RequestDriver(port, self.recorder, self.topology, policy, Query(query, self.tokens.count(query)),
                               request_id=request_id, max_tokens=max_tokens or self.max_tokens, prompt_id=prompt_id,
                               keep_text=True, tokenizer=self.tokens, final_max_tokens=final_max_tokens)
        try:
            port.report(driver.start)
            await asyncio.wait_for(asyncio.shield(port.finished), self.request_timeout_s)
        except asyncio.TimeoutError:
            driver.expire(f"request timed out after {self.request_timeout_s:g}s")
        except asyncio.CancelledError as err:
            if err.args and err.args[0]:  # a cancel that says why (a server's): the request's row says it too
                driver.expire(f"cancelled: {err.args[0]}")
            raise
        finally:
            if listener is not None and port.finished.done() and not port.finished.exception():
                listener.ended(port.finished.result())
            await port.close()
        return port.finished.result()

    def _sampling(self, request_id: int, node_id: str, s: Sampling | None = None) -> Sampling:
        """Distinct but reproducible streams per request and node from the request's
        sampling ``s`` (default: the runner's); the final node's from ``final_seed`` when
        set (the quality harness's noise floor resamples the aggregator alone)."""
        s = s or self.sampling
        if s.seed is None:
            return s
        seed = self.final_seed if self.final_seed is not None and node_id == self.topology.final.id else s.seed
        return replace(s, seed=(seed * 1_000_003 + zlib.crc32(f"{request_id}/{node_id}".encode())) % 2**31)

    @staticmethod
    def call_ended(call: "_LiveCall") -> None:
        """A call is over (its coroutine ended, or its task was cancelled before it ran):
        one call less in flight on its replica, its KV released; once per call."""
        if call.released:
            return
        call.released = True
        call.replica.in_flight -= 1
        call.replica.kv_tokens -= call.held

    async def _call(self, call: "_LiveCall", port: "_LivePort") -> None:
        """Stream one call, cut it into the scheduler's chunks, report to the driver."""
        g, driver = call.generate, call.driver
        engine = call.replica.engine
        key = f"{port.tag}-{g.node}-{g.call}"
        sampling = self._sampling(driver.request_id, g.node, port.sampling)
        if call.session is not None:
            stream = call.session.stream(g.prompt, g.max_tokens, sampling, last=g.final_call)
        else:
            stream = engine.stream(key, g.prompt, g.max_tokens, sampling)
        watch = CallWatch(self.paces[id(engine)], g.prompt.tokens, final=call.node.is_final, healthy=engine.healthy)
        finish = None
        try:
            while True:
                try:
                    delta = await watch.next(stream)
                except StopAsyncIteration:
                    break
                watch.on_delta(delta.tokens, delta.prompt_tokens)
                self._delta(call, port, delta)
                finish = delta.finish_reason or finish
            if call.chunker.tokens:
                port.report(driver.chunk, call, *call.chunker.take(), self.now())
            self.placement.outcome(call.replica, True, time.monotonic())
            port.report(driver.finished, call, finish or "stop", self.now())
        except EngineError as err:
            self._failed_on(call.replica, err)
            port.report(driver.failed, call, err.reason, self.now())
        except asyncio.CancelledError:
            await (call.session.close() if call.session is not None else engine.abort(key))
            raise
        finally:
            self.call_ended(call)  # now, not at the task's done-callback: the next placement sees it
            watch.close()
            await watch.stop()
            await stream.aclose()

    def _failed_on(self, replica, err: EngineError) -> None:
        """A call failed on ``replica``: counted toward its ejection (``Placement.outcome``),
        which a pool of several replicas logs."""
        if self.placement.outcome(replica, False, time.monotonic()):
            pool = self.placement.engine_pools().get(replica.engine.name, "")
            if len(self.placement.pools.get(pool, ())) > 1:
                print(f"staircase: replica {replica.engine.name} ejected for {self.placement.cooldown_s:g}s after "
                      f"{self.placement.eject_after} failed calls in a row (last: {err.reason})", file=sys.stderr)

    def _delta(self, call: "_LiveCall", port: "_LivePort", delta) -> None:
        """One delta of a call: its tokens held, its prompt counts and chunk reported; the
        final node's text handed to the request's listener as it arrives."""
        driver = call.driver
        call.hold(delta.tokens)
        t = self.now()
        if delta.prompt_tokens is not None:
            port.report(driver.admitted, call, delta.prompt_tokens, delta.cached_tokens or 0)
        elif delta.cached_tokens:  # known only at the call's end (an OpenAI server's last usage)
            port.report(driver.cached_later, call, delta.cached_tokens)
        if port.listener is not None and call.node.is_final and delta.tokens and not driver.done:
            port.report(port.listener.text, delta.text, delta.tokens, t)
        if call.chunker.add(delta.text, delta.tokens, t):
            port.report(driver.chunk, call, *call.chunker.take(), t)


class _Chunker:
    """Groups a call's deltas into the scheduler's chunks: a chunk ends at the first
    delta that reaches its boundary (cumulative output tokens of the call). A policy
    with adaptive chunks appends boundaries as the call goes (``_LivePort.extend_call``)."""

    __slots__ = ("boundaries", "next_i", "produced", "texts", "tokens", "first_s")

    def __init__(self, boundaries: Sequence[int]):
        self.boundaries = list(boundaries)
        self.next_i = self.produced = self.tokens = 0
        self.texts: list[str] = []
        self.first_s: float | None = None

    def add(self, text: str, tokens: int, t: float) -> bool:
        """Add a delta; True when it completes a chunk."""
        if not tokens:
            return False
        if self.first_s is None:
            self.first_s = t
        self.texts.append(text)
        self.tokens += tokens
        self.produced += tokens
        reached = False
        while self.next_i < len(self.boundaries) and self.produced >= self.boundaries[self.next_i]:
            self.next_i += 1
            reached = True
        return reached

    def take(self) -> tuple[int, str, float]:
        """(tokens, text, first token time) of the chunk so far; starts the next."""
        out = (self.tokens, "".join(self.texts), self.first_s)
        self.tokens, self.texts, self.first_s = 0, [], None
        return out


class _LiveCall(CallRecord):
    """A live call's record: its chunker too (the port extends its boundaries), and the
    engine session it is a step of (``session`` layout; None: a call of its own)."""

    __slots__ = ("chunker", "session", "replica", "held", "released")

    def __init__(self, driver: RequestDriver, generate: Generate, node: Node, sent_s: float, tokens_before: int,
                 replica: Replica):
        super().__init__(driver, generate, node, sent_s, tokens_before)
        self.chunker = _Chunker(generate.boundaries)
        self.session = None
        self.replica, self.held = replica, 0  # where it runs; the KV tokens it holds there
        self.released = False  # counted out of its replica (``LiveRunner.call_ended``)

    def hold(self, tokens: int) -> None:
        self.held += tokens
        self.replica.kv_tokens += tokens


class _LivePort:
    """The live runner's side of one request's driver: wall clock, real engines, one
    asyncio task per call. Errors inside the driver end the request (``finished``)."""

    def __init__(self, runner: LiveRunner, tag: str, sampling: Sampling, listener=None):
        self.runner = runner
        self.tag = tag  # engine request ids start with it
        self.sampling, self.listener = sampling, listener  # (``LiveRunner.run_request``)
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future = self.loop.create_future()
        self.tasks: list[asyncio.Task] = []
        self.sessions: dict = {}  # node -> (its engine session, its replica) (``session`` layout)

    def report(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # a runner or scheduler bug: end the request with it, never hang
            if not self.finished.done():
                self.finished.set_exception(err)

    def now(self) -> float:
        return self.runner.now()

    def start_call(self, driver: RequestDriver, generate: Generate, node: Node, sent_s: float,
                   tokens_before: int) -> CallRecord:
        placement = self.runner.placement
        if generate.prompt.session and node.id in self.sessions:  # a session's steps stay on its engine
            session, replica = self.sessions[node.id]
        else:
            session, replica = None, placement.pick(node.slot, driver.request_id, generate.node, time.monotonic())
        call = _LiveCall(driver, generate, node, sent_s, tokens_before, replica)
        call.engine = replica.name
        if generate.prompt.session:
            if session is None:
                session = replica.engine.open_session(f"{self.tag}-{node.id}-session")
                self.sessions[node.id] = session, replica
            call.session = session
        call.handle = asyncio.create_task(self.runner._call(call, self))
        self.tasks.append(call.handle)
        replica.in_flight += 1  # until the task is done, however it ends (even before it ran)
        call.hold(generate.prompt.tokens)
        call.handle.add_done_callback(lambda _task: self.runner.call_ended(call))
        return call

    def in_flight(self, node: Node) -> int:
        return self.runner.placement.least_in_flight(node.slot)

    def cancel_call(self, call: CallRecord) -> None:
        if call.handle is not None:
            call.handle.cancel()

    def extend_call(self, call: "_LiveCall", boundary: int) -> None:
        call.chunker.boundaries.append(boundary)

    def set_timer(self, delay_s: float, fire) -> None:
        self.loop.call_later(delay_s, self.report, fire)

    def request_done(self, driver: RequestDriver) -> None:
        self.runner.placement.release(driver.request_id)
        if not self.finished.done():
            self.finished.set_result(driver.row)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for session, _ in self.sessions.values():
            await session.close()
