"""The per-request scheduler: a deterministic state machine, events in, actions out.

It knows no clock and does no I/O; the caller owns the clock and passes ``now_s``.
The simulator turns actions into SimPy work on simulated engines, the live runner
into streaming requests on real engines; both feed back the same events.

Events: ``Started``, ``Chunk`` (a node delivered chunk k: tokens and text),
``Finished`` (a call ended: ``stop`` at EOS or ``length`` at max_tokens), ``Failed``,
``TimerFired``. Actions: ``Generate`` (node, prompt, max tokens, chunk boundaries),
``NextChunk`` (the next boundary of a streaming call, for policies that set them as
the call goes), ``Cancel``, ``Emit`` (text to the user), ``SetTimer``, ``Done``.

Events about a call that is no longer current (a chunk that raced a cancel) are
ignored; events that no runner should produce (a chunk out of order, a node never
started) raise ``ProtocolError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from enum import StrEnum

from .errors import ConfigError, ProtocolError
from .policies.base import ConsumerView, DecisionKind, Policy, StreamView
from .prompts import ConsumerPrompts, Piece, Prompt, TextPieces, Tokenizer, query_piece, source_prompt
from .topology import Node, Topology

# ----------------------------------------------------------------------------- events


@dataclass(slots=True)
class Started:
    node: str
    call: int


@dataclass(slots=True)
class Chunk:
    node: str
    call: int
    index: int  # chunk index over the node's whole answer
    tokens: int
    text: str | None = None


@dataclass(slots=True)
class Finished:
    node: str
    call: int
    reason: str = "stop"  # "stop" (EOS) or "length" (reached the call's max_tokens)


@dataclass(slots=True)
class Failed:
    node: str
    call: int
    reason: str


@dataclass(slots=True)
class TimerFired:
    key: tuple


Event = Started | Chunk | Finished | Failed | TimerFired

# ---------------------------------------------------------------------------- actions


@dataclass(slots=True)
class Generate:
    node: str
    call: int
    prompt: Prompt
    max_tokens: int
    boundaries: tuple[int, ...]  # cumulative output tokens of this call at which chunks end (the
    # last is max_tokens, unless the policy sets boundaries as the call goes: then NextChunk follows)
    first_chunk_index: int
    step: int
    final_call: bool


@dataclass(slots=True)
class NextChunk:
    """The call's next chunk ends at ``boundary`` (cumulative output tokens of the call);
    sent when the call reached its last known boundary, before it goes on."""

    node: str
    call: int
    boundary: int


@dataclass(slots=True)
class Cancel:
    node: str
    call: int
    reason: str


@dataclass(slots=True)
class Emit:
    node: str
    chunk_index: int
    tokens: int
    text: str | None


@dataclass(slots=True)
class SetTimer:
    key: tuple
    delay_s: float


@dataclass(slots=True)
class Done:
    outcome: str  # "ok" or "error"
    error: str | None
    lost: dict  # node -> reason, for every input that failed


Action = Generate | NextChunk | Cancel | Emit | SetTimer | Done

class NodeStatus(StrEnum):
    """Where a node of one request stands (string-valued: JSON-friendly)."""

    PENDING = "pending"  # not started
    RUNNING = "running"  # a call in flight
    IDLE = "idle"  # between steps
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


PENDING, RUNNING, IDLE, FINISHED, FAILED, CANCELLED = NodeStatus  # short names for the hot paths below
_new_piece = tuple.__new__  # a named tuple's own __new__ is interpreted Python: one per chunk costs it
_WAIT, _STEP, _FINAL, _FAIL = DecisionKind


@dataclass(frozen=True)
class Query:
    """The user's request. ``text`` may be absent (the simulator needs only tokens)."""

    text: str | None = None
    tokens: int | None = None


class _NodeState:
    """A node's progress; also what consumers' policies see of it (``UpstreamView``)."""

    __slots__ = ("node", "status", "call", "pieces", "chunk_end_s", "tokens", "step", "final_call",
                 "timer_step", "prompts", "inputs", "sent_s", "call_start", "call_max", "call_bound", "chunks",
                 "finished", "failed", "max_tokens")

    def __init__(self, node: Node, max_tokens: int):
        self.node = node
        self.max_tokens = max_tokens  # this node's answer cap
        self.status = PENDING
        self.call = -1
        self.pieces: list[Piece] = []
        self.chunk_end_s: list[float] = []
        self.tokens = 0
        self.step = 0
        self.final_call = False
        self.timer_step = -1
        self.prompts: ConsumerPrompts | None = None
        self.inputs: tuple[_NodeState, ...] = ()
        self.sent_s = -1.0  # when the current call was sent
        self.call_start = self.call_max = self.call_bound = 0  # the current call's first token, limit and
        # last known boundary, in the node's output tokens
        # what policies read most, kept as plain fields (they run on every input chunk)
        self.chunks = 0  # chunks delivered
        self.finished = False  # answer complete (status FINISHED)
        self.failed = False  # status FAILED

    @property
    def chunk_sizes(self) -> list[int]:
        return [p.tokens for p in self.pieces]


class Scheduler:
    """One request through one topology under one policy.

    ``Scheduler(topology, policy, query).start(now_s) -> [Action]``, then
    ``.on(event, now_s) -> [Action]`` until a ``Done`` action."""

    def __init__(self, topology: Topology, policy: Policy, query: Query, max_tokens: int = 512,
                 tokenizer: Tokenizer | None = None, texts: TextPieces | None = None,
                 load: Callable[[str], int] | None = None, final_max_tokens: int | None = None):
        """``max_tokens``: every node's answer cap; ``final_max_tokens``: the final node's
        instead (MoA setups often give the aggregator its own cap; default: the same)."""
        final_max_tokens = max_tokens if final_max_tokens is None else final_max_tokens
        for field, value in (("max_tokens", max_tokens), ("final_max_tokens", final_max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(field, value, "an integer >= 1")
        policy.validate_for(topology)
        self.policy = policy
        self.topology = policy.plan(topology)
        self.texts = texts or TextPieces(tokenizer)
        self.query = query_piece(query.text, query.tokens, self.texts.tokenizer)
        self.states = {n.id: _NodeState(n, final_max_tokens if n.is_final else max_tokens)
                       for n in self.topology.nodes}
        self.lost: dict[str, str] = {}
        self.policy_state = policy.new_state(self.topology)  # the policy's own, for this request
        self.load = load  # node id -> calls in flight on its engine (the runner's count), for the views
        self._adaptive_chunks = policy.ADAPTIVE_CHUNKS
        self._source_prompt: Prompt | None = None
        self.done: Done | None = None
        for n in self.topology.nodes:
            if n.upstream:
                st = self.states[n.id]
                st.prompts = ConsumerPrompts(policy.layout, n.role, self.query, n.upstream, n.index, self.texts)
                st.inputs = tuple(self.states[u] for u in n.upstream)

    # ------------------------------------------------------------------ public API
    def start(self, now_s: float = 0.0) -> list[Action]:
        actions: list[Action] = []
        for n in self.topology.nodes:
            if n.is_source:
                st = self.states[n.id]
                st.call += 1
                st.status = RUNNING
                st.final_call = True
                if self._source_prompt is None:
                    self._source_prompt = source_prompt(self.query, self.texts)
                boundaries = self._call_boundaries(st, st.max_tokens, now_s, True)
                actions.append(Generate(n.id, st.call, self._source_prompt, st.max_tokens, boundaries, 0, 0, True))
        # a consumer may start before any input (a lead-in step from the query alone) or ask for a timer
        return self._evaluate([n.id for n in self.topology.nodes if not n.is_source], now_s, actions)

    def on(self, event: Event, now_s: float) -> list[Action]:
        if self.done is not None:
            return []
        if isinstance(event, TimerFired):
            node_id, step = event.key
            st = self.states[node_id]
            if st.status in (PENDING, IDLE) and st.step == step:
                return self._evaluate([node_id], now_s)
            return []
        st = self.states.get(event.node)
        if st is None:
            raise ProtocolError(f"event for unknown node {event.node!r}")
        if event.call != st.call or st.status != RUNNING:
            if event.call > st.call:
                raise ProtocolError(f"event for call {event.call} of {event.node}, which was never started")
            return []  # stale: the call was cancelled or already ended
        if isinstance(event, Started):
            return []
        if isinstance(event, Chunk):
            return self._on_chunk(st, event.node, event.index, event.tokens, event.text, now_s)
        if isinstance(event, Finished):
            return self._on_finished(st, event, now_s)
        if isinstance(event, Failed):
            return self._on_failed(st, event, now_s)
        raise ProtocolError(f"unknown event {event!r}")

    def on_chunk(self, node_id: str, call: int, index: int, tokens: int, text: str | None,
                 now_s: float) -> list[Action]:
        """``on(Chunk(node_id, call, index, tokens, text), now_s)`` without the event
        object (the runners' hot path: once per chunk)."""
        st = self.states.get(node_id)
        if self.done is not None or st is None or call != st.call or st.status is not RUNNING:
            return self.on(Chunk(node_id, call, index, tokens, text), now_s)  # the rare paths, and their errors
        return self._on_chunk(st, node_id, index, tokens, text, now_s)

    # --------------------------------------------------------------- event handlers
    def _on_chunk(self, st: _NodeState, node_id: str, index: int, tokens: int, text: str | None,
                  now_s: float) -> list[Action]:
        if index != st.chunks:
            raise ProtocolError(f"{node_id}: chunk {index} arrived, expected chunk {st.chunks}")
        if tokens < 1 or st.tokens + tokens > st.max_tokens:
            raise ProtocolError(f"{node_id}: chunk of {tokens} tokens after {st.tokens} (max {st.max_tokens})")
        piece = _new_piece(Piece, (("out", node_id, index), tokens, text))  # Piece(key, tokens, text), minus a frame
        st.pieces.append(piece)
        st.chunks += 1
        st.chunk_end_s.append(now_s)
        st.tokens += tokens
        if st.prompts is not None:
            st.prompts.add_output(piece)
        actions: list[Action] = []
        if self._adaptive_chunks and st.call_bound <= st.tokens < st.call_max:
            actions.append(self._next_chunk(st, now_s))
        if st.node.is_final:
            actions.append(Emit(node_id, index, tokens, text))
        self._evaluate(self.topology.downstream[node_id], now_s, actions)
        return actions

    def _on_finished(self, st: _NodeState, ev: Finished, now_s: float) -> list[Action]:
        complete = st.final_call or st.tokens >= st.max_tokens or (
            ev.reason == "stop" and self.policy.ends_on_stop(st.node, st.step))
        if not complete:
            st.status = IDLE
            st.step += 1
            return self._evaluate([st.node.id], now_s)
        st.status = FINISHED
        st.finished = True
        if st.node.is_final:
            return self._finish("ok", None)
        actions = self._evaluate(self.topology.downstream[st.node.id], now_s)
        return actions

    def _on_failed(self, st: _NodeState, ev: Failed, now_s: float) -> list[Action]:
        st.status = FAILED
        st.failed = True
        self.lost[st.node.id] = ev.reason
        if st.node.is_final:
            return self._finish("error", f"{st.node.id} failed: {ev.reason}")
        return self._evaluate(self.topology.downstream[st.node.id], now_s)

    # ------------------------------------------------------------------- decisions
    def view(self, node_id: str, now_s: float) -> ConsumerView:
        st = self.states[node_id]
        return ConsumerView(st.node, st.step, now_s, st.tokens, st.inputs, self.policy_state, self.states, self.load)

    def _evaluate(self, node_ids, now_s: float, actions: list[Action] | None = None) -> list[Action]:
        """Ask the policy about each of ``node_ids`` that may start a step; the actions go
        onto ``actions`` (a new list when None), which is returned."""
        if actions is None:
            actions = []
        for node_id in node_ids:
            if self.done is not None:
                break
            st = self.states[node_id]
            if st.status is not PENDING and st.status is not IDLE:
                continue
            view = self.view(node_id, now_s)
            decision = self.policy.decide(view)
            kind = decision.kind
            if kind == _WAIT:
                if decision.wake_after_s is not None and st.timer_step != st.step:
                    st.timer_step = st.step
                    actions.append(SetTimer((node_id, st.step), max(0.0, decision.wake_after_s)))
            elif kind == _FAIL:
                lost = ", ".join([f"{u} ({self.lost.get(u, '?')})" for u in st.node.upstream if u in self.lost])
                actions += self._finish("error", f"{node_id} cannot go on: {decision.reason}: {lost}")
                return actions
            elif kind == _STEP or kind == _FINAL:
                generate = self._generate(st, view, decision, kind == _FINAL)
                actions.append(generate)
                if generate.final_call:
                    actions += self._release_inputs(st.node)
            else:
                raise ProtocolError(f"policy {self.policy.name} returned unknown decision {decision.kind!r}")
        return actions

    def _generate(self, st: _NodeState, view: ConsumerView, decision, final: bool) -> Generate:
        remaining = st.max_tokens - st.tokens
        max_tokens = remaining if final else self._step_tokens(st, view, decision, remaining)
        prompt = st.prompts.next([u.pieces for u in st.inputs])
        st.call += 1
        st.status = RUNNING
        st.final_call = final or max_tokens == remaining
        boundaries = self._call_boundaries(st, max_tokens, view.now_s, final)
        return Generate(st.node.id, st.call, prompt, max_tokens, boundaries, st.chunks, st.step, st.final_call)

    def _step_tokens(self, st: _NodeState, view: ConsumerView, decision, remaining: int) -> int:
        """A step's size: the decision's, else the schedule's; at most what is left."""
        size = decision.tokens
        if size is None:
            size = self.policy.output_schedule(st.node).size(view.step)
        elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ProtocolError(f"policy {self.policy.name} chose a step of {size!r} tokens (an integer >= 1)")
        return size if size < remaining else remaining

    def _call_boundaries(self, st: _NodeState, max_tokens: int, now_s: float, streamed: bool = True) -> tuple[int, ...]:
        """A new call's chunk boundaries: one chunk for a step; for a streamed call (a
        source's, a consumer's final one) all of them from the schedule, or, for a policy
        with adaptive chunks, the first one (the next ones asked as each is reached)."""
        st.sent_s = now_s
        st.call_start = tokens = st.tokens
        st.call_max = tokens + max_tokens
        if not streamed:
            st.call_bound = st.call_max
            return (max_tokens,)
        if not self._adaptive_chunks:
            st.call_bound = st.call_max
            return self.policy.output_schedule(st.node).boundaries(st.chunks, max_tokens)
        st.call_bound = tokens
        return (self._next_chunk(st, now_s).boundary,)

    def _next_chunk(self, st: _NodeState, now_s: float) -> NextChunk:
        """Ask the policy for the size of the call's next chunk (at its last boundary)."""
        call_tokens = st.tokens - st.call_start
        view = StreamView(st.node, st.chunks, now_s, st.tokens, call_tokens, st.call_max - st.call_start,
                          self.policy_state, self.states, self.load)
        size = self.policy.chunk_tokens(view)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ProtocolError(f"policy {self.policy.name} chose a chunk of {size!r} tokens (an integer >= 1)")
        st.call_bound = min(st.tokens + size, st.call_max)
        return NextChunk(st.node.id, st.call, st.call_bound - st.call_start)

    def _release_inputs(self, consumer: Node) -> list[Action]:
        """Cancel inputs that no reader will read again (all readers are in their final call)."""
        actions: list[Action] = []
        for u in consumer.upstream:
            us = self.states[u]
            if us.status != RUNNING:
                continue
            readers = [self.states[d] for d in self.topology.downstream[u]]
            if all(r.final_call or r.status in (FINISHED, FAILED, CANCELLED) for r in readers):
                us.status = CANCELLED
                actions.append(Cancel(u, us.call, "not needed: every reader started its final call"))
        return actions

    def _finish(self, outcome: str, error: str | None) -> list[Action]:
        actions: list[Action] = []
        for st in self.states.values():
            if st.status == RUNNING:
                st.status = CANCELLED
                actions.append(Cancel(st.node.id, st.call, "request ended"))
        self.done = Done(outcome, error, dict(self.lost))
        actions.append(self.done)
        return actions

    # ---------------------------------------------------------------- introspection
    def output_text(self) -> str:
        return "".join(p.text or "" for p in self.states[self.topology.final.id].pieces)

    def status(self, node_id: str) -> str:
        return self.states[node_id].status
