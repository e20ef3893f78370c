"""``simulate``: one policy over one workload on simulated engines; a pure function of
its inputs and seed. ``simulate_policies`` runs several policies on the same requests
(same arrivals, lengths and noise streams), so their differences are the policies'.
"""

from __future__ import annotations

import gc
from array import array
from contextlib import contextmanager
from typing import Callable, Mapping, Sequence

import numpy as np
import simpy

from staircase.deployment import Deployment, Placement, replica_names
from staircase.driver import Recorder, RequestDriver
from staircase.errors import ConfigError
from staircase.policies import Policy
from staircase.progress import progress as progress_bar
from staircase.prompts import TextPieces, Tokenizer
from staircase.scheduler import Generate, Query
from staircase.topology import Node, Topology
from staircase.trace import Trace

from .engine import Draws, SimCall, SimEngine
from .faults import RandomFaults, parse_fault_rates
from .profile import Profile
from staircase.workload import Request, Workload, make_requests


class _SimPort:
    """The simulator's side of the request driver: SimPy's clock and the simulated
    engines. A simulated call is its driver's record (``SimCall`` is a ``CallRecord``)
    and reports straight to it."""

    def __init__(self, env: simpy.Environment, engines: dict[str, SimEngine], slot_engine: dict[str, str],
                 lengths: dict[str, np.ndarray], on_done: Callable[[int], None], faults: Mapping[str, int],
                 placement: Placement | None = None, random_faults: RandomFaults | None = None):
        self.faults = faults  # node -> tokens after which its answer breaks off (fault injection)
        self.random_faults = random_faults  # a failure rate per call (by group, slot or pool), drawn per call
        self.faults_injected = 0
        self.env = env
        self.engines = engines
        self.slot_engine = slot_engine
        self.placement = placement  # a deployment's pools and routers; None: one engine per slot
        # node -> natural answer length per request (an array of C ints: Python ints out, 8 bytes each)
        self.lengths = {node: array("q", a.tolist()) for node, a in lengths.items()}
        self.on_done = on_done

    # ------------------------------------------------------------------ the port
    def now(self) -> float:
        return self.env.now

    def start_call(self, driver: RequestDriver, g: Generate, node: Node, sent_s: float,
                   tokens_before: int) -> SimCall:
        rid = driver.request_id
        natural = self.lengths[g.node][rid] - tokens_before
        prompt = g.prompt
        if node.is_source:  # system + query: the same prompt for every source node of this request
            shared_tokens, shared_key = prompt.tokens, (rid, "source")
        else:  # the instruction, shared across requests
            shared_tokens, shared_key = prompt.shared_prefix_tokens, (driver.policy.layout, node.role,
                                                                      prompt.messages[0].pieces[0].key)
        call = SimCall(driver, g, node, tokens_before, (rid, g.node), prompt.tokens, prompt.reuse_prefix_tokens,
                       shared_tokens, shared_key, max(1, natural), prompt.session)
        if self.faults and g.node in self.faults:
            call.fail_after(max(0, self.faults[g.node] - tokens_before))
        call.engine = self._place(rid, g.node, node.slot)
        if self.random_faults is not None:
            self._draw_fault(call, rid, g, node.slot)
        self.engines[call.engine].submit(call)  # sets sent_s (the engine's clock: the same now)
        return call

    def _draw_fault(self, call: SimCall, rid: int, g: Generate, slot: str) -> None:
        """A random fault on this call, at a token of the answer it will give (``ends[-1]``)."""
        rf = self.random_faults
        at = rf.fail_token(rid, g.node, g.call, rf.rate(slot, call.engine), call.ends[-1])
        if at is not None:
            call.fail_after(at)
            self.faults_injected += 1

    def _place(self, request_id: int, node_id: str, slot: str) -> str:
        """The engine a call runs on: its slot's, or the one its pool's router picks."""
        if self.placement is None:
            return self.slot_engine[slot]
        return self.placement.pick(slot, request_id, node_id).name

    def cancel_call(self, call: SimCall) -> None:
        self.engines[call.engine].cancel(call)

    def extend_call(self, call: SimCall, boundary: int) -> None:
        call.extend(boundary)

    def in_flight(self, node: Node) -> int:
        if self.placement is not None:  # a pool: its least busy replica's count (where least-loaded sends)
            return self.placement.least_in_flight(node.slot)
        return self.engines[self.slot_engine[node.slot]].in_flight

    def set_timer(self, delay_s: float, fire: Callable[[], None]) -> None:
        self.env.timeout(delay_s).callbacks.append(lambda _event: fire())

    def request_done(self, driver: RequestDriver) -> None:
        if self.placement is not None:
            self.placement.release(driver.request_id)
        self.on_done(driver.request_id)


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
            factor = np.array([draws.draw() for _ in requests])
            lengths[node.id] = np.maximum(1, np.rint(out_tokens * factor)).astype(np.int64)
    return lengths


def simulate(topology: Topology, policy: Policy, workload: Workload | Sequence[Request], profile: Profile, *,
             seed: int = 0, max_tokens: int = 512, noise: bool = True, keep_chunks: bool = True,
             progress: bool | None = None, concurrency: int | None = None, node_lengths: Mapping | None = None,
             tokenizer: Tokenizer | None = None, faults: Mapping[str, int] | None = None, fault_rates=None,
             deployment: Deployment | None = None, watch: Callable | None = None, watch_every_s: float = 10.0) -> Trace:
    """Run ``policy`` over the workload; returns the trace (requests, and chunks unless ``keep_chunks=False``).
    A request list with ``concurrency`` is a closed loop of that many users (else requests arrive at their
    ``arrival_s``); ``node_lengths``: every node's answer length per request; ``tokenizer`` counts the fixed
    prompt texts; ``faults``: node id -> tokens before its answer breaks off (``fault_rates``: at random, sim/faults.py);
    ``deployment``: pools behind routers, not the profile's sharing; ``watch``: may stop the run early (``_Watch``)."""
    requests, closed, wdesc = _requests(workload, seed, concurrency)
    policy.validate_for(topology)  # before any work
    faults, random_faults = _check_faults(policy.plan(topology), faults, fault_rates, seed, deployment)
    engines, slot_engine, placement = _engines(env := simpy.Environment(), topology, profile, seed, noise, deployment)
    lengths = _node_lengths(topology, profile, requests, seed, node_lengths)
    bar, pending = progress_bar(len(requests), f"sim {policy.name}", progress), iter(requests)
    texts, watching = TextPieces(tokenizer), _Watch(env, watch, watch_every_s, len(requests), recorder := Recorder(keep_chunks))

    def begin(req: Request) -> None:
        driver = RequestDriver(port, recorder, topology, policy, Query(req.text, req.query_tokens),
                               request_id=req.request_id, max_tokens=max_tokens, texts=texts)
        watching.started(req.request_id, driver)
        driver.start()

    def on_done(rid: int) -> None:
        bar.update(1)
        watching.ended(rid)
        nxt = next(pending, None) if closed is not None else None  # closed loop: the next user's request
        if nxt is not None:
            begin(nxt)

    port = _SimPort(env, engines, slot_engine, lengths, on_done, faults, placement, random_faults)
    _arrive(env, requests, closed, pending, begin)
    with _fewer_gc_passes():
        watching.run()
    bar.close()
    meta = {"policy": policy.describe(), "topology": topology.describe(), "workload": wdesc, "seed": seed,
            "max_tokens": max_tokens, "noise": noise, "sim_end_s": env.now, **_run_report(profile, engines, faults, port),
            **watching.report()}
    return watching.trace(recorder, policy.name, meta)


class _Watch:
    """A run, with a ``watch`` or none: the drivers of the requests in flight (request id ->
    ``RequestDriver``), the finished request rows, and an event that ends the run when
    the last request ends, or earlier when ``watch(now, in_flight, finished)`` answers
    True (a run that can no longer meet a target need not be simulated to its end)."""

    def __init__(self, env: simpy.Environment, watch, every_s: float, total: int, recorder: Recorder):
        self.env, self.watch, self.every_s, self.total = env, watch, every_s, total
        self.finished = recorder.requests
        self.in_flight: dict[int, RequestDriver] = {}
        self.stop = env.event()

    def started(self, request_id: int, driver: RequestDriver) -> None:
        if self.watch is not None:
            self.in_flight[request_id] = driver

    def ended(self, request_id: int) -> None:
        if self.watch is None:
            return
        self.in_flight.pop(request_id, None)
        if len(self.finished) == self.total and not self.stop.triggered:
            self.stop.succeed()

    def run(self) -> None:
        if self.watch is None:
            self.env.run()
            return
        self.env.process(self._ticks())
        self.env.run(until=self.stop)

    def _ticks(self):
        while not self.stop.triggered:
            yield self.env.timeout(self.every_s)
            if self.stop.triggered:
                return
            if self.env.peek() == float("inf"):  # nothing else will happen: a deadlock, reported as one
                self.stop.succeed("deadlock")
            elif self.watch(self.env.now, self.in_flight, self.finished):
                self.stop.succeed("watch")

    def report(self) -> dict:
        """What the run's meta says of an early stop."""
        if not self.stop.triggered or self.stop.value != "watch":
            return {}
        return {"stopped_s": self.env.now, "unfinished": self.total - len(self.finished)}

    def trace(self, recorder: Recorder, policy: str, meta: dict) -> Trace:
        trace = recorder.trace(policy, meta)
        if len(trace.requests) != self.total and "stopped_s" not in meta:  # a deadlock
            raise RuntimeError(f"simulation ended with {self.total - len(trace.requests)} requests unfinished")
        return trace


@contextmanager
def _fewer_gc_passes(gen0: int = 20_000):
    """A run allocates many short-lived objects and few cycles (drivers break theirs):
    a higher first-generation threshold saves most collector passes (restored after)."""
    old = gc.get_threshold()
    gc.set_threshold(max(gen0, old[0]), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _check_faults(plan: Topology, faults: Mapping[str, int] | None, rates, seed: int,
                  deployment: Deployment | None) -> tuple[dict[str, int], RandomFaults | None]:
    """The fixed faults (node id -> tokens) and the random ones (rates by group, slot or pool), checked."""
    rates = parse_fault_rates(rates)
    pools = list(deployment.pools) if deployment is not None else []
    random_faults = RandomFaults(rates, seed).check([n.slot for n in plan.nodes], pools) if rates else None
    return _fixed_faults(plan, faults), random_faults


def _fixed_faults(plan: Topology, faults: Mapping[str, int] | None) -> dict[str, int]:
    if faults is None:
        return {}
    if not isinstance(faults, Mapping):
        raise ConfigError("faults", faults, "a mapping of node id -> tokens before the node fails")
    for node, tokens in faults.items():
        if node not in plan.by_id:
            raise ConfigError("faults", node, f"node ids of the topology this policy runs: {', '.join(plan.by_id)}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ConfigError(f"faults.{node}", tokens, "an integer >= 0 (tokens before the failure)")
    return dict(faults)


def _run_report(profile: Profile, engines: dict[str, SimEngine], faults: dict[str, int], port: _SimPort) -> dict:
    rf = port.random_faults
    return {"profile": profile.name, "profile_calibrated": profile.calibrated, "engines": _engine_report(engines)} \
        | ({"faults": faults} if faults else {}) \
        | ({"fault_rates": dict(rf.rates), "faults_injected": port.faults_injected} if rf is not None else {})


def _engine_report(engines: dict[str, SimEngine]) -> dict:
    return {n: e.report() for n, e in engines.items()}


def _requests(workload: Workload | Sequence[Request], seed: int, concurrency: int | None):
    """(requests, closed-loop users or None, workload record)."""
    if isinstance(workload, Workload):
        return make_requests(workload, seed), workload.concurrency if workload.closed_loop else None, workload.describe()
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1):
        raise ConfigError("concurrency", concurrency, "an integer >= 1 or None (open loop)")
    requests = list(workload)
    return requests, concurrency, {"kind": "explicit", "requests": len(requests), "concurrency": concurrency}


def _engines(env: simpy.Environment, topology: Topology, profile: Profile, seed: int, noise: bool,
             deployment: Deployment | None = None):
    """(engine instance -> SimEngine, slot -> engine instance, placement): each slot's
    engine placed once (placement None), or a deployment's replicas (``<pool>/<i>``)
    behind a router per pool (slot -> engine empty: the placement places every call)."""
    if deployment is None:
        placed = {n.slot: profile.engine_for_slot(n.slot) for n in topology.nodes}  # slot -> (instance, model)
        models = dict(placed.values())  # instance -> model
        slot_engine = {slot: instance for slot, (instance, _) in placed.items()}
    else:
        used = {p.name: p for p in (deployment.pool_for_slot(n.slot) for n in topology.nodes)}.values()
        models = {name: _model(profile, p.model) for p in used for name in replica_names(p)}
        slot_engine = {}
    names = sorted(models)
    streams = np.random.SeedSequence([seed, 0xE9]).spawn(len(names))
    engines = {name: SimEngine(env, name, models[name], np.random.default_rng(ss), noise=noise)
               for name, ss in zip(names, streams)}
    placement = None if deployment is None else Placement(
        deployment, {n.slot for n in topology.nodes}, {p.name: [engines[n] for n in replica_names(p)] for p in used},
        seed)
    return engines, slot_engine, placement


def _model(profile: Profile, name: str):
    if name not in profile.engines:
        raise ConfigError("deployment.model", name, f"an engine model of profile {profile.name}: "
                                                    f"{', '.join(profile.engines)}")
    return profile.engines[name]


def _arrive(env: simpy.Environment, requests: Sequence[Request], closed: int | None, pending, begin) -> None:
    """Closed loop: ``closed`` users start at once (the next request when one ends,
    by ``on_done``); open loop: each request at its arrival time."""
    if closed is not None:
        for _ in range(min(closed, len(requests))):
            begin(next(pending))
        return

    def arrivals():
        for req in requests:
            if req.arrival_s > env.now:
                yield env.timeout(req.arrival_s - env.now)
            begin(req)
    env.process(arrivals())


def simulate_policies(topology: Topology, policies: Sequence[Policy], workload, profile: Profile,
                      **kwargs) -> dict[str, Trace]:
    for p in policies:
        p.validate_for(topology)
    return {p.name: simulate(topology, p, workload, profile, **kwargs) for p in policies}
