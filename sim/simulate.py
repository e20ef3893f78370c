"""``simulate``: one policy over one workload on simulated engines; a pure function of
its inputs and seed. ``simulate_policies`` runs several policies on the same requests
(same arrivals, lengths and noise streams), so their differences are the policies'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import simpy

from staircase.metrics import request_metrics
from staircase.progress import progress as progress_bar
from staircase.policy import Policy
from staircase.errors import ConfigError
from staircase.prompts import TextPieces, Tokenizer
from staircase.scheduler import (Cancel, Chunk, Done, Emit, Finished, Generate, Query, Scheduler,
                                 SetTimer, TimerFired)
from staircase.topology import Topology
from staircase.trace import CHUNK_COLUMNS, REQUEST_COLUMNS, Trace, frame

from .engine import Draws, SimCall, SimEngine
from .profile import Profile
from .workload import Request, Workload, make_requests


@dataclass
class _Shared:
    """What every request of one run shares."""

    env: simpy.Environment
    topology: Topology
    policy: Policy
    engines: dict[str, SimEngine]
    slot_engine: dict[str, str]
    lengths: dict[str, np.ndarray]  # node -> natural answer length per request
    max_tokens: int
    texts: TextPieces
    keep_chunks: bool
    chunk_rows: list
    request_rows: list
    on_done: Callable[[int], None]


class _RequestRun:
    """Drives one request's scheduler with simulated engines."""

    __slots__ = ("s", "req", "sched", "calls", "user", "prompt_tokens", "cached_tokens", "n_calls", "arrival_s")

    def __init__(self, shared: _Shared, req: Request, arrival_s: float):
        self.s = shared
        self.req = req
        self.arrival_s = arrival_s
        self.sched = Scheduler(shared.topology, shared.policy, Query(req.text, req.query_tokens),
                               shared.max_tokens, texts=shared.texts)
        self.calls: dict[str, SimCall] = {}
        self.user: list[tuple[int, float, float]] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.n_calls = 0

    def start(self) -> None:
        self._apply(self.sched.start(self.s.env.now))

    def _apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, Generate):
                self._generate(a)
            elif isinstance(a, Cancel):
                call = self.calls.get(a.node)
                if call is not None:
                    self.s.engines[self.s.slot_engine[self.sched.topology.by_id[a.node].slot]].cancel(call)
            elif isinstance(a, Emit):
                pass  # user-visible chunks are recorded with their times in _chunk
            elif isinstance(a, SetTimer):
                ev = self.s.env.timeout(a.delay_s)
                ev.callbacks.append(lambda _e, k=a.key: self._event(TimerFired(k)))
            elif isinstance(a, Done):
                self._done(a)

    def _event(self, event) -> None:
        self._apply(self.sched.on(event, self.s.env.now))

    def _generate(self, g: Generate) -> None:
        s = self.s
        node = self.sched.topology.by_id[g.node]
        natural = int(s.lengths[g.node][self.req.request_id]) - self.sched.states[g.node].tokens
        prompt = g.prompt
        engine = s.slot_engine[node.slot]
        if node.is_source:  # system + query: the same prompt for every source node of this request
            shared_tokens, shared_key = prompt.tokens, (self.req.request_id, "source")
        else:  # the instruction, shared across requests
            shared_tokens, shared_key = prompt.shared_prefix_tokens, (s.policy.layout, node.role,
                                                                      prompt.messages[0].pieces[0].key)
        call = SimCall(self, (node, g.call, g.first_chunk_index, engine), (self.req.request_id, g.node),
                       prompt.tokens, prompt.reuse_prefix_tokens, shared_tokens, shared_key,
                       g.max_tokens, max(1, natural), g.boundaries)
        self.calls[g.node] = call
        self.n_calls += 1
        s.engines[engine].submit(call)

    # ------------------------------------------------ the engine reports (SimCall.owner)
    def admitted(self, call: SimCall, cached: int) -> None:
        self.prompt_tokens += call.prompt_tokens
        self.cached_tokens += cached

    def chunk(self, call: SimCall, index: int, tokens: int, first_s: float, end_s: float) -> None:
        node, call_id, first_index, engine = call.tag
        if node.is_final:
            self.user.append((tokens, first_s, end_s))
        s = self.s
        if s.keep_chunks:
            first_of_call = index == 0
            s.chunk_rows.append((
                self.req.request_id, s.policy.name, node.id, node.role, node.stage, engine, call_id,
                first_index + index, tokens, call.prompt_tokens if first_of_call else 0,
                call.cached if first_of_call else 0, call.sent_s if first_of_call else call.last_end_s,
                first_s, end_s, node.is_final))
        self._apply(self.sched.on(Chunk(node.id, call_id, first_index + index, tokens, None), s.env.now))

    def finished(self, call: SimCall, reason: str) -> None:
        node, call_id, _, _ = call.tag
        self._apply(self.sched.on(Finished(node.id, call_id, reason), self.s.env.now))

    def _done(self, d: Done) -> None:
        m = request_metrics(self.user, self.arrival_s)
        lost = "; ".join(f"{k}: {v}" for k, v in sorted(d.lost.items()))
        self.s.request_rows.append((
            self.req.request_id, self.s.policy.name, self.arrival_s, self.sched.query.tokens, d.outcome,
            d.error or "", lost, m["ttft_s"], m["e2e_s"], m["tpot_s"], m["output_tokens"],
            m["output_tokens_per_s"], m["longest_stall_s"], m["stalls_over_threshold"], self.n_calls,
            self.prompt_tokens, self.cached_tokens))
        self.calls.clear()  # SimCall.owner points back here: break the cycle so refcounting frees both
        self.s.on_done(self.req.request_id)


def _node_lengths(topology: Topology, profile: Profile, requests: Sequence[Request], seed: int,
                  given: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Natural answer length of every node for every request: the request's output
    length for the final node, times a per-node factor for the others. Drawn for the
    full topology, whatever the policy, so policies see the same answers. ``given``
    (node -> one length per request, in request order) replaces the draws, as when a
    live run is replayed with the answer lengths it had."""
    if given is not None:
        if any(r.request_id != i for i, r in enumerate(requests)):
            raise ConfigError("requests", "request ids out of order", "ids 0, 1, ... in list order with node_lengths")
        missing = [n.id for n in topology.nodes if n.id not in given]
        if missing:
            raise ConfigError("node_lengths", sorted(given), f"a length list for every node (missing {', '.join(missing)})")
        out = {}
        for node in topology.nodes:
            arr = np.asarray(given[node.id], dtype=np.int64)
            if arr.shape != (len(requests),):
                raise ConfigError(f"node_lengths.{node.id}", f"{arr.size} values", f"{len(requests)} (one per request)")
            out[node.id] = np.maximum(1, arr)
        return out
    out_tokens = np.array([r.output_tokens for r in requests], dtype=np.float64)
    rng = np.random.default_rng([seed, 0x1E4])
    draws = Draws(profile.proposer_length_factor, rng, block=max(1, len(requests)))
    lengths = {}
    for node in topology.nodes:
        if node.is_final:
            lengths[node.id] = np.maximum(1, np.rint(out_tokens)).astype(np.int64)
        else:
            factor = np.array([draws() for _ in requests])
            lengths[node.id] = np.maximum(1, np.rint(out_tokens * factor)).astype(np.int64)
    return lengths


def simulate(topology: Topology, policy: Policy, workload: Workload | Sequence[Request], profile: Profile, *,
             seed: int = 0, max_tokens: int = 512, noise: bool = True, keep_chunks: bool = True,
             progress: bool | None = None, concurrency: int | None = None,
             node_lengths: Mapping[str, Sequence[int]] | None = None, tokenizer: Tokenizer | None = None) -> Trace:
    """Run ``policy`` over the workload; returns the trace (requests, and chunks unless
    ``keep_chunks=False``, the summary-only mode).

    With an explicit request list: ``concurrency`` runs it as a closed loop with that
    many users (else each request arrives at its ``arrival_s``); ``node_lengths`` gives
    every node's answer length per request; ``tokenizer`` counts the fixed prompt texts
    (instructions, labels) with a real tokenizer instead of the approximate one."""
    if isinstance(workload, Workload):
        requests = make_requests(workload, seed)
        closed = workload.concurrency if workload.closed_loop else None
        wdesc = workload.describe()
    else:
        requests = list(workload)
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1):
            raise ConfigError("concurrency", concurrency, "an integer >= 1 or None (open loop)")
        closed = concurrency
        wdesc = {"kind": "explicit", "requests": len(requests), "concurrency": concurrency}
    # Validate before any work.
    policy.validate_for(topology)
    plan = policy.plan(topology)
    env = simpy.Environment()
    placed = {n.slot: profile.engine_for_slot(n.slot) for n in topology.nodes}  # slot -> (instance, model)
    slot_engine = {slot: instance for slot, (instance, _) in placed.items()}
    models = dict(placed.values())  # instance -> model
    engine_names = sorted(models)
    streams = np.random.SeedSequence([seed, 0xE9]).spawn(len(engine_names))
    engines = {name: SimEngine(env, name, models[name], np.random.default_rng(ss), noise=noise)
               for name, ss in zip(engine_names, streams)}
    lengths = _node_lengths(topology, profile, requests, seed, node_lengths)
    bar = progress_bar(len(requests), f"sim {policy.name}", progress)
    pending = iter(requests)

    def on_done(_rid: int) -> None:
        bar.update(1)
        if closed is not None:
            nxt = next(pending, None)
            if nxt is not None:
                _RequestRun(shared, nxt, env.now).start()

    shared = _Shared(env, plan, policy, engines, slot_engine, lengths, max_tokens, TextPieces(tokenizer),
                     keep_chunks, [], [], on_done)
    if closed is not None:
        for _ in range(min(closed, len(requests))):
            _RequestRun(shared, next(pending), 0.0).start()
    else:
        def arrivals():
            for req in requests:
                if req.arrival_s > env.now:
                    yield env.timeout(req.arrival_s - env.now)
                _RequestRun(shared, req, env.now).start()
        env.process(arrivals())
    env.run()
    bar.close()
    req_df = frame(shared.request_rows, REQUEST_COLUMNS).sort_values("request_id", kind="stable").reset_index(drop=True)
    chunk_df = frame(shared.chunk_rows, CHUNK_COLUMNS) if keep_chunks else None
    meta = {"policy": policy.describe(), "topology": topology.describe(), "workload": wdesc,
            "profile": profile.name, "profile_calibrated": profile.calibrated, "seed": seed,
            "max_tokens": max_tokens, "noise": noise, "sim_end_s": env.now,
            "engines": {n: {"model": e.m.name, "prefills": e.prefills, "decode_intervals": e.iterations_scheduled}
                        for n, e in engines.items()}}
    if len(req_df) != len(requests):
        raise RuntimeError(f"simulation ended with {len(requests) - len(req_df)} requests unfinished (a deadlock)")
    return Trace(policy.name, req_df, chunk_df, meta)


def simulate_policies(topology: Topology, policies: Sequence[Policy], workload, profile: Profile,
                      **kwargs) -> dict[str, Trace]:
    for p in policies:
        p.validate_for(topology)
    return {p.name: simulate(topology, p, workload, profile, **kwargs) for p in policies}
