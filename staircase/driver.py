"""The one request loop the simulator and the live runner share.

A ``RequestDriver`` runs one request: it starts the scheduler, applies its actions
through a ``Port`` (the runner's clock and engines: start a call, cancel it, set a
timer, say the request is done), turns what the runner reports about each call
(``admitted``, ``chunk``, ``finished``, ``failed``) into scheduler events, and records
the request in named rows (``ChunkRow``, ``RequestRow``) on a ``Recorder``. Runners
keep only their clock and engines behind the port; nothing of a request's logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from .metrics import request_metrics
from .policies.base import Policy
from .prompts import TextPieces, Tokenizer
from .scheduler import (Cancel, Done, Emit, Failed, Finished, Generate, NextChunk, Query, Scheduler, SetTimer,
                        TimerFired)
from .topology import Node, Topology
from .trace import ChunkRow, RequestRow, Trace, frame, CHUNK_COLUMNS, REQUEST_COLUMNS


class Port(Protocol):
    """What a runner gives a driver. ``start_call`` makes the call's record (a
    ``CallRecord``, or the runner's own subclass of it), names its engine, begins the
    call and returns the record; the runner later reports about it to ``call.driver``.
    The other methods act at once."""

    def now(self) -> float: ...

    def start_call(self, driver: "RequestDriver", generate: Generate, node: Node, sent_s: float,
                   tokens_before: int) -> "CallRecord": ...

    def cancel_call(self, call: "CallRecord") -> None: ...

    def extend_call(self, call: "CallRecord", boundary: int) -> None:
        """The call's next chunk ends at ``boundary`` (cumulative output tokens of the
        call). Asked while the driver handles the chunk that reached the last boundary,
        before the runner's call goes on (policies with adaptive chunks)."""

    def set_timer(self, delay_s: float, fire: Callable[[], None]) -> None: ...

    def in_flight(self, node: Node) -> int:
        """Calls in flight (sent, not ended; every request's) on the engine serving ``node``."""

    def request_done(self, driver: "RequestDriver") -> None: ...


class CallRecord:
    """One ``Generate`` as a runner carries it out; ``handle`` is the runner's own (an
    asyncio task; the simulator's calls are records themselves, ``staircase.sim.engine.SimCall``).
    A plain slots class: one is made per call, on the simulator's hot path."""

    __slots__ = ("driver", "generate", "node", "engine", "sent_s", "tokens_before", "prompt_tokens",
                 "cached_tokens", "chunks", "last_end_s", "handle")

    def __init__(self, driver: "RequestDriver", generate: Generate, node: Node, sent_s: float, tokens_before: int):
        self.driver = driver
        self.generate = generate
        self.node = node
        self.engine = ""  # named by the port's start_call
        self.sent_s = sent_s
        self.tokens_before = tokens_before  # the node's output tokens before this call
        self.prompt_tokens = self.cached_tokens = self.chunks = 0
        self.last_end_s = 0.0
        self.handle: object = None


@dataclass
class Recorder:
    """The rows of a run, as the drivers write them."""

    keep_chunks: bool = True
    requests: list[RequestRow] = field(default_factory=list)
    chunks: list[ChunkRow] = field(default_factory=list)

    def trace(self, policy: str, meta: dict, first_request: int = 0, first_chunk: int = 0) -> Trace:
        reqs = [r for r in self.requests[first_request:] if r.policy == policy]
        chunks = [c for c in self.chunks[first_chunk:] if c.policy == policy] if self.keep_chunks else None
        req_df = frame(reqs, REQUEST_COLUMNS).sort_values("request_id", kind="stable").reset_index(drop=True)
        return Trace(policy, req_df, frame(chunks, CHUNK_COLUMNS) if chunks is not None else None, meta)


class RequestDriver:
    """One request through the scheduler, on a runner's port."""

    __slots__ = ("port", "recorder", "policy", "sched", "request_id", "arrival_s", "prompt_id", "keep_text",
                 "calls", "user", "prompt_tokens", "cached_tokens", "n_calls", "context_tokens", "row", "done")

    def __init__(self, port: Port, recorder: Recorder, topology: Topology, policy: Policy, query: Query, *,
                 request_id: int, max_tokens: int, arrival_s: float | None = None, prompt_id: str | None = None,
                 keep_text: bool = False, tokenizer: Tokenizer | None = None, texts: TextPieces | None = None,
                 final_max_tokens: int | None = None):
        self.port, self.recorder, self.policy = port, recorder, policy
        self.sched = Scheduler(topology, policy, query, max_tokens, tokenizer=tokenizer, texts=texts,
                               final_max_tokens=final_max_tokens)
        # what views show as ``load``: the port's count for a node's engine (a closure over the port and the
        # node states, not a method of this driver: that would be a cycle, and cycles wait for the collector)
        in_flight, states = port.in_flight, self.sched.states
        self.sched.load = lambda node_id: in_flight(states[node_id].node)
        self.request_id = request_id
        self.arrival_s = port.now() if arrival_s is None else arrival_s
        self.prompt_id, self.keep_text = prompt_id, keep_text
        self.calls: dict[str, CallRecord] = {}  # node -> its current call
        self.user: list[tuple[int, float, float]] = []  # (tokens, first token, end) of user-visible chunks
        self.prompt_tokens = self.cached_tokens = self.n_calls = 0
        self.context_tokens = float("nan")  # inputs read by the final node's first call
        self.row: RequestRow | None = None
        self.done = False

    def start(self) -> "RequestDriver":
        now = self.port.now()
        self._apply(self.sched.start(now), now)
        return self

    # ------------------------------------------------------------ what the runner reports
    def admitted(self, call: CallRecord, prompt_tokens: int, cached_tokens: int) -> None:
        call.prompt_tokens, call.cached_tokens = prompt_tokens, cached_tokens
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens

    def cached_later(self, call: CallRecord, cached_tokens: int) -> None:
        """Cached prompt tokens an engine reports only as the call ends (vLLM's OpenAI
        server gives them in the stream's last usage): the call's first chunk row and the
        request's count take them (live runs only; a backward scan of the rows)."""
        extra = cached_tokens - call.cached_tokens
        if not extra or self.done:
            return
        call.cached_tokens = cached_tokens
        self.cached_tokens += extra
        if not (call.chunks and self.recorder.keep_chunks):
            return
        rows, g, name = self.recorder.chunks, call.generate, self.policy.name
        for i in range(len(rows) - 1, -1, -1):
            r = rows[i]
            if (r.request_id == self.request_id and r.node == call.node.id and r.call == g.call
                    and r.chunk_index == g.first_chunk_index and r.policy == name):
                rows[i] = r._replace(cached_tokens=cached_tokens)
                return

    def chunk(self, call: CallRecord, tokens: int, text: str | None, first_s: float, end_s: float) -> None:
        """A chunk of ``call`` ended at ``end_s`` (now, on the runner's clock)."""
        if self.done:
            return
        node, g, first = call.node, call.generate, call.chunks == 0
        index = g.first_chunk_index + call.chunks
        if node.is_final:
            self.user.append((tokens, first_s, end_s))
        if self.recorder.keep_chunks:
            self.recorder.chunks.append(ChunkRow(
                self.request_id, self.policy.name, node.id, node.role, node.stage, call.engine, g.call, index, tokens,
                call.prompt_tokens if first else 0, call.cached_tokens if first else 0,
                call.sent_s if first else call.last_end_s, first_s, end_s, node.is_final, text))
        call.chunks += 1
        call.last_end_s = end_s
        actions = self.sched.on_chunk(node.id, g.call, index, tokens, text, end_s)  # reported as it ends
        if actions:
            self._apply(actions, end_s)

    def finished(self, call: CallRecord, reason: str, now_s: float) -> None:
        """``call`` ended (``stop`` or ``length``) at ``now_s`` on the runner's clock."""
        call.handle = None  # the call is over; its handle points back to it (a cycle)
        if not self.done:
            self._apply(self.sched.on(Finished(call.node.id, call.generate.call, reason), now_s), now_s)

    def failed(self, call: CallRecord, reason: str, now_s: float) -> None:
        call.handle = None
        if not self.done:
            self._apply(self.sched.on(Failed(call.node.id, call.generate.call, reason), now_s), now_s)

    def expire(self, reason: str) -> None:
        """End the request now with an error (a runner's request deadline)."""
        if not self.done:
            for call in list(self.calls.values()):
                self.port.cancel_call(call)
            self._finish(Done("error", reason, dict(self.sched.lost)))

    # ------------------------------------------------------------------------ actions
    def _apply(self, actions, now: float) -> None:
        for a in actions:
            kind = type(a)  # (exact types first: this runs on every chunk)
            if kind is Emit:
                continue  # user-visible chunks are recorded with their times in chunk()
            if kind is Generate or isinstance(a, Generate):
                self._generate(a, now)
            elif isinstance(a, NextChunk):
                call = self.calls.get(a.node)
                if call is not None and call.generate.call == a.call:
                    self.port.extend_call(call, a.boundary)
            elif isinstance(a, Cancel):
                call = self.calls.pop(a.node, None)
                if call is not None:
                    self.port.cancel_call(call)
                    call.handle = None
            elif isinstance(a, SetTimer):
                self.port.set_timer(a.delay_s, lambda key=a.key: self._timer(key))
            elif isinstance(a, Done):
                self._finish(a)
            else:
                raise TypeError(f"unknown action {a!r}")

    def _timer(self, key: tuple) -> None:
        if not self.done:
            now = self.port.now()
            self._apply(self.sched.on(TimerFired(key), now), now)

    def _generate(self, g: Generate, now: float) -> None:
        state = self.sched.states[g.node]  # the planned topology's node and its output so far
        self.n_calls += 1
        if g.call == 0 and state.node.is_final:  # its prompt holds every input chunk delivered so far
            self.context_tokens = sum([u.tokens for u in state.inputs])
        self.calls[g.node] = self.port.start_call(self, g, state.node, now, state.tokens)

    def _finish(self, d: Done) -> None:
        self.done = True
        m = request_metrics(self.user, self.arrival_s)
        lost = "; ".join(f"{k}: {v}" for k, v in sorted(d.lost.items()))
        self.row = RequestRow(
            self.request_id, self.policy.name, self.arrival_s, self.sched.query.tokens, d.outcome, d.error or "",
            lost, m["ttft_s"], m["e2e_s"], m["tpot_s"], m["output_tokens"], m["output_tokens_per_s"],
            m["longest_stall_s"], m["stalls_over_threshold"], self.n_calls, self.prompt_tokens, self.cached_tokens,
            self.context_tokens, self.prompt_id, self.sched.output_text() if self.keep_text else None)
        self.recorder.requests.append(self.row)
        for call in self.calls.values():
            call.handle = None  # the runner's handle points back to its record
        self.calls.clear()  # records point back here: break the cycles so refcounting frees them
        self.port.request_done(self)
