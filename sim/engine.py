"""A simulated LLM engine: continuous batching, prefill cost, prefix cache, API overhead.

Events are at chunk granularity, never one per token. Decoding is modelled in
virtual iterations: every sequence in the batch gains one token per iteration, and
one iteration takes ``base + per_seq * B + per_context_token * C`` seconds, where C,
the batch's context, grows by B tokens per iteration. Between two events the batch
is fixed, so the time for n iterations has a closed form (an arithmetic series) and
the engine only wakes when some sequence reaches a chunk boundary, a call arrives or
is cancelled, or a prefill ends.

Prefill: waiting calls are admitted together (up to the batch and KV limits) in one
engine step that produces each call's first token; a call that arrives while a decode
iteration is under way waits for its end (a real engine schedules between steps; measured
live: a call's arrival in the engine core waits for the step in progress). On an idle engine the step costs
``prefill_s`` of their uncached prompt tokens. When sequences are decoding it is a
mixed step, as in vLLM's scheduler (running decodes and whole new prefills in one
batch): one decode iteration plus the prefill's marginal cost (``prefill_s`` less its
base, the step's fixed cost already paid by the iteration), and every decoding
sequence gains its token of that iteration. The prefix cache keeps, per (request, node), the
tokens of the node's last prompt plus output (LRU within the KV budget; a step of a
streaming-input session, ``session`` layout, reuses all of it but the last sampled token,
whatever the cache holds: vLLM keeps a session's KV between steps), the
system instruction of each prompt kind once seen, and a request's source prompt
(system + query, identical for all its first-stage proposers) once one of them was
prefilled; hits round down to whole blocks
and leave at least one token to compute, as vLLM does.

With a token budget per step (the profile's ``max_num_batched_tokens``: vLLM's chunked
prefill on a GPU), a step holds one token per running decode and at most the rest of the
budget of prompt tokens; a longer prompt goes on over several steps, each a mixed step
with the decodes, its attention over its earlier parts costed by the cross term. A call
is admitted when its prompt and whole answer fit the KV left (vLLM allocates as it goes
and preempts when full; here a call that would not fit queues instead: no preemption).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import OrderedDict, deque

import numpy as np
import simpy

from staircase.driver import CallRecord

from .profile import EngineModel, Noise

EPS = 1e-9
FAILED = "failed"  # a call's end reason under fault injection (SimCall.fail_after)
SHARED_KEYS = 4096  # shared-prefix keys an engine remembers (system prompts; one request's source prompt)


class _Wake:
    """An engine's timer on SimPy's queue: what SimPy's loop reads of an event
    (``callbacks``, ``_ok``) and nothing more, a C struct when compiled (setup.py).
    About a million are made in a 20,000-request run; this instead of SimPy's own
    ``Timeout`` (an instance dict, made by interpreted code) made the compiled run 8 % faster."""

    __slots__ = ("callbacks", "_ok", "value")

    def __init__(self, env: simpy.Environment, delay: float, callback, value=None):
        if delay < 0:
            raise ValueError(f"negative delay {delay}")
        self.callbacks = [callback]
        self._ok = True
        self.value = value
        env.schedule(self, simpy.events.NORMAL, delay)


class Draws:
    """Buffered draws of one noise distribution (1.0 when there is no noise)."""

    def __init__(self, noise: Noise | None, rng: np.random.Generator, block: int = 1024):
        self._dist = noise.frozen() if noise is not None else None
        self._rng = rng
        self._block = block
        self._buf: list[float] = []

    def draw(self) -> float:
        buf = self._buf
        if buf:
            return buf.pop()
        if self._dist is None:
            return 1.0
        self._buf = buf = self._dist.rvs(size=self._block, random_state=self._rng).tolist()
        buf.reverse()
        return buf.pop()


class SimCall(CallRecord):
    """One Generate on an engine, and the request driver's record of it: the engine
    reports progress to ``driver`` (``admitted``, ``chunk``, ``finished``, ``failed``)."""

    __slots__ = ("key", "reuse_tokens", "shared_tokens", "shared_key", "ends", "reason", "end_i", "join_iter",
                 "cancelled", "open", "session", "computed")

    def __init__(self, driver, generate, node, tokens_before: int, key, prompt_tokens: int, reuse_tokens: int,
                 shared_tokens: int, shared_key, natural_tokens: int, session: bool = False):
        # CallRecord's fields, set here rather than through its __init__ (one call less per simulated call)
        self.driver, self.generate, self.node, self.engine = driver, generate, node, ""
        self.sent_s = self.last_end_s = 0.0
        self.tokens_before = tokens_before
        self.cached_tokens = self.chunks = 0
        self.handle = None
        self.key = key
        self.prompt_tokens = prompt_tokens
        self.reuse_tokens = reuse_tokens
        self.shared_tokens = shared_tokens
        self.shared_key = shared_key
        self.cancelled = False
        self.session = session  # a step of an engine session: its reuse is kept KV, not the cache's
        self.open = False  # counted in its engine's in_flight (submitted, not ended or cancelled)
        self.computed = -1  # prompt tokens in KV (cached + prefilled) once admitted; -1 before (chunked prefill)
        max_tokens, boundaries = generate.max_tokens, generate.boundaries
        self.reason = "stop" if natural_tokens <= max_tokens else "length"
        # chunk ends, cumulative in the call; the last is where the call stops. A policy
        # with adaptive chunks gives the first boundary only and the next ones as it goes
        # (``extend``), so they go in before the stop.
        if natural_tokens < max_tokens:
            stop = natural_tokens if natural_tokens > 1 else 1
            self.ends = [b for b in boundaries if b < stop] + [stop]
        elif boundaries[-1] == max_tokens:
            self.ends = list(boundaries)
        else:
            self.ends = [*boundaries, max_tokens]
        self.end_i = 0  # index in ends of the chunk in progress
        self.join_iter = 0.0

    def extend(self, boundary: int) -> None:
        """The next chunk ends at ``boundary`` (asked while the engine reports the chunk
        at the last known boundary, so the engine schedules it next)."""
        if boundary < self.ends[-1] or (boundary == self.ends[-1] and self.reason is FAILED):
            self.ends.insert(len(self.ends) - 1, boundary)

    def fail_after(self, tokens: int) -> None:
        """Fault injection: the call fails once it has produced ``tokens`` tokens (0: at
        its first token), if it gets that far; the chunks that ended by then are
        delivered, the tokens since are lost (as a live stream that breaks)."""
        if tokens < self.ends[-1]:
            self.ends = [b for b in self.ends if b <= tokens] + [tokens]
            self.reason = FAILED


class SimEngine:
    def __init__(self, env: simpy.Environment, name: str, model: EngineModel, rng: np.random.Generator,
                 noise: bool = True):
        self.env = env
        self.name = name
        self.model = model
        # what the hot path reads of the model, once (the model does not change in a run)
        self._base_s, self._per_seq_s = model.decode_base_s, model.decode_per_seq_s
        self._per_token_s = model.decode_per_context_token_s
        self._overhead_s, self._kv_tokens = model.request_overhead_s, model.kv_cache_tokens
        self._block, self._max_batch = model.block_size_tokens, model.max_batch_size
        self._step_tokens = model.max_num_batched_tokens  # 0: whole prompts in one step
        nz = model.noise if noise else {}
        self._prefill_noise = Draws(nz.get("prefill"), rng)
        self._decode_noise = Draws(nz.get("decode"), rng)
        self._overhead_noise = Draws(nz.get("overhead"), rng)
        self.batch: set[SimCall] = set()
        self.heap: list = []  # (target iteration, tie, call)
        self._tie = 0
        self.iters = 0.0
        self.context = 0.0  # context tokens of the batch at self.iters
        self.last_t = 0.0
        self.factor = 1.0
        self.waiting: deque[SimCall] = deque()
        self.prefilling: list[SimCall] | None = None
        self.prefill_end = 0.0
        self._mixed = False
        self._timer = None  # the one live timer; older ones are stale
        self._decode_target = 0.0  # the iteration the live decode timer wakes at
        self._on_prefill_timer_cb, self._on_decode_timer_cb = self._on_prefill_timer, self._on_decode_timer
        self._busy = False
        self.cache: OrderedDict = OrderedDict()  # (request, node) -> tokens
        self.cache_tokens = 0
        self.shared_seen: OrderedDict = OrderedDict()  # shared-prefix keys seen, most recent last (bounded)
        self.running_tokens = 0  # KV of admitted calls (prompt + generated at admission + growth)
        self.in_flight = 0  # calls submitted and not ended or cancelled (what policies see as load)
        # counters for reports
        self.iterations_scheduled = 0
        self.prefills = 0
        self._open_accounts()

    def _open_accounts(self) -> None:
        """Time accounts (``_account``, at every event that can change the engine's state)."""
        self._acct_t = 0.0
        self.busy_s = 0.0  # time with a prefill or a decoding batch under way
        self.kv_token_s = 0.0  # integral of the KV tokens admitted calls hold or will hold (``running_tokens``)
        self.kv_peak = 0
        self.queue_waits = array("d")  # per admitted call: sent -> admitted (overhead + queue), seconds

    def _account(self, now: float) -> None:
        """Add the time since the last event to the accounts (the state is constant in between)."""
        if self.running_tokens > self.kv_peak:  # what the engine held since the last event
            self.kv_peak = self.running_tokens
        dt = now - self._acct_t
        if dt > 0:
            if self.batch or self.prefilling is not None:
                self.busy_s += dt
            self.kv_token_s += self.running_tokens * dt
            self._acct_t = now

    def report(self) -> dict:
        """What a run's meta records of this engine (``sim_end_s``: the run's end)."""
        return {"model": self.model.name, "prefills": self.prefills, "decode_intervals": self.iterations_scheduled,
                "busy_s": self.busy_s, "kv_token_s": self.kv_token_s, "kv_peak": self.kv_peak,
                "admitted": len(self.queue_waits),
                "queue_wait_mean_s": sum(self.queue_waits) / len(self.queue_waits) if self.queue_waits else 0.0,
                "queue_wait_p90_s": float(np.percentile(self.queue_waits, 90)) if self.queue_waits else 0.0}

    # --------------------------------------------------------------------- API
    @property
    def kv_tokens(self) -> int:
        """Tokens the running batch holds (its context): what a least-KV router reads."""
        return int(self.context)

    def submit(self, call: SimCall) -> None:
        """Send a call; it reaches the engine after the per-request overhead."""
        call.sent_s = self.env.now
        call.open = True
        self.in_flight += 1
        delay = self._overhead_s * self._overhead_noise.draw()
        _Wake(self.env, delay, self._arrive_event, call)

    def cancel(self, call: SimCall) -> None:
        if call.cancelled:
            return
        self._account(self.env.now)
        call.cancelled = True
        self._close(call)
        if call in self.batch:
            self._advance(self.env.now)
            self._leave(call)
            self._reschedule()

    # ---------------------------------------------------------------- internals
    def _arrive_event(self, ev) -> None:
        call = ev.value
        if call.cancelled:
            return
        self._account(self.env.now)
        self.waiting.append(call)
        if self.prefilling is None:
            self._advance(self.env.now)
            self._reschedule()

    def _iteration_terms(self) -> tuple[float, float]:
        """(time of the next decode iteration, its growth per iteration as context grows)."""
        b = len(self.batch)
        u = (self._base_s + self._per_seq_s * b + self._per_token_s * self.context) * self.factor
        v = self._per_token_s * b * self.factor
        return u, v

    def _advance(self, now: float) -> None:
        """Bring the fluid decode state up to ``now`` (no-op while prefilling)."""
        dt = now - self.last_t
        self.last_t = now
        if self.prefilling is not None or not self.batch or dt <= 0:
            return
        u, v = self._iteration_terms()
        if v > 0:
            half = u - v / 2
            n = (-half + math.sqrt(half * half + 2 * v * dt)) / v
        else:
            n = dt / u
        self.iters += n
        self.context += len(self.batch) * n

    def _generated(self, call: SimCall) -> float:
        return 1 + self.iters - call.join_iter

    def _close(self, call: SimCall) -> None:
        """The call no longer counts as in flight (it ended or was cancelled)."""
        if call.open:
            call.open = False
            self.in_flight -= 1

    def _leave(self, call: SimCall) -> None:
        self.batch.discard(call)
        self._close(call)
        ctx = call.prompt_tokens + self._generated(call)
        self.context -= ctx
        self.running_tokens -= call.prompt_tokens + call.ends[-1]
        if not self.batch:
            self.context = 0.0
        self._remember(call.key, int(ctx))

    def _remember(self, key, tokens: int) -> None:
        old = self.cache.pop(key, 0)
        self.cache_tokens += tokens - old
        self.cache[key] = tokens
        self._evict()

    def _evict(self) -> None:
        budget = self._kv_tokens - self.running_tokens
        while self.cache_tokens > budget and self.cache:
            _, t = self.cache.popitem(last=False)
            self.cache_tokens -= t

    def _cached_tokens(self, call: SimCall) -> int:
        if call.session and call.reuse_tokens:
            return call.reuse_tokens - 1  # the session kept its KV; the last sampled token is fed in again
        hit = 0
        entry = self.cache.get(call.key)
        if entry is not None and call.reuse_tokens:
            hit = min(call.reuse_tokens, entry)
            self.cache.move_to_end(call.key)
        if call.shared_key in self.shared_seen:
            hit = max(hit, call.shared_tokens)
            self.shared_seen.move_to_end(call.shared_key)
        else:
            self.shared_seen[call.shared_key] = None
            if len(self.shared_seen) > SHARED_KEYS:
                self.shared_seen.popitem(last=False)
        block = self._block
        hit = (hit // block) * block
        return max(0, min(hit, call.prompt_tokens - 1))

    def _reschedule(self) -> None:
        """Start a prefill if calls wait, else set a timer for the next chunk boundary."""
        if self._busy or self.prefilling is not None:
            return
        self._timer = None  # any pending decode timer is stale now
        if self.waiting and self._start_prefill():
            return
        if self.batch:
            self._arm_decode_timer()

    def _mid_iteration(self) -> bool:
        """Whether a decode iteration is under way (the batch decodes and ``iters`` is
        between two whole iterations): a new call waits for its end, as a real engine
        schedules new work only between steps. On an idle engine the next step starts
        a whole iteration."""
        if not self.batch:
            self.iters = float(math.ceil(self.iters - 1e-6))
            return False
        return abs(self.iters - math.floor(self.iters + 0.5)) > 1e-6

    def _start_prefill(self) -> bool:
        """Admit waiting calls together (up to the batch and KV limits) into one prefill
        step, and time it; False when none could be admitted or an iteration must end first.
        With a token budget per step (``max_num_batched_tokens``, vLLM's chunked prefill),
        the step holds the running decodes' tokens and at most the rest of the budget of
        prompt tokens: the last call admitted may get only part of its prompt, and goes
        on in the next step (its first token comes with its last part)."""
        if self._mid_iteration():
            return False
        if self._step_tokens:
            return self._start_chunked_prefill()
        group: list[SimCall] = []
        uncached, squares, cross = 0, 0.0, 0.0  # new tokens; their squares and products with cached ones, summed
        model = self.model
        while self.waiting and len(self.batch) + len(group) < self._max_batch:
            call = self.waiting[0]
            if call.cancelled:
                self.waiting.popleft()
                continue
            if not self._admit(call, bool(group)):
                break  # no room now; a first call is always admitted so nothing starves
            self.waiting.popleft()
            cached = call.computed
            new = call.prompt_tokens - cached
            uncached, squares, cross = uncached + new, squares + new * new, cross + new * cached
            group.append(call)
        if not group:
            return False
        self._time_step(group, uncached, squares, cross)
        return True

    def _start_chunked_prefill(self) -> bool:
        """One step under the token budget (``_start_prefill``): calls whose prompt ends
        in it go to ``prefilling``; a call cut by the budget stays first in ``waiting``
        with its ``computed`` tokens, and the step's timer runs it on too."""
        group: list[SimCall] = []
        uncached, squares, cross = 0, 0.0, 0.0
        budget = self._step_tokens - len(self.batch)  # each running decode takes a token of the step
        if budget < 1:
            budget = 1
        partial = None  # the call the budget cuts: it stays first in waiting, goes on in the next step
        while self.waiting and budget > 0 and len(self.batch) + len(group) < self._max_batch:
            call = self.waiting[0]
            if call.cancelled:
                self.waiting.popleft()
                if call.computed >= 0:  # admitted, cut by an earlier step's budget: free its KV
                    self.running_tokens -= call.prompt_tokens + call.ends[-1]
                continue
            if call.computed < 0 and not self._admit(call, bool(group or self.batch)):
                break  # no KV room: it queues (vLLM would preempt; see the module's docstring)
            done = call.computed
            new = call.prompt_tokens - done
            if new > budget:
                new = budget
            uncached, squares, cross = uncached + new, squares + new * new, cross + new * done
            budget -= new
            call.computed = done + new
            if call.computed < call.prompt_tokens:
                partial = call
                break
            self.waiting.popleft()
            group.append(call)
        if not group and partial is None:
            return False
        self._time_step(group, uncached, squares, cross)
        return True

    def _admit(self, call: SimCall, others: bool) -> bool:
        """Admit a waiting call (its KV reserved, its cache hit counted in ``computed``);
        False when others hold the KV it needs."""
        need = call.prompt_tokens + call.ends[-1]
        if others and self.running_tokens + need > self._kv_tokens:
            return False
        self.running_tokens += need
        self._evict()
        cached = self._cached_tokens(call)
        call.computed = cached
        call.driver.admitted(call, call.prompt_tokens, cached)
        self.queue_waits.append(self.env.now - call.sent_s)
        return True

    def _time_step(self, group: list, uncached: float, squares: float, cross: float) -> None:
        """Time a prefill step of ``group`` (``uncached`` new tokens in all) and start it."""
        model = self.model
        self.prefilling = group
        self.prefills += 1
        cost = model.prefill_s(uncached, squares, cross)
        if self.batch:  # a mixed step: the running sequences decode one token in it
            self._mixed = True
            u = model.decode_iteration_s(len(self.batch), self.context) * self._decode_noise.draw()
            duration = u + (cost - model.prefill_base_s) * self._prefill_noise.draw()
        else:
            self._mixed = False
            duration = cost * self._prefill_noise.draw()
        self._prefill_timer(duration)

    def _prefill_timer(self, duration: float) -> None:
        now = self.env.now
        self.prefill_end = now + duration
        # (the delay as rounded from the end: the same times as ever)
        self._timer = _Wake(self.env, self.prefill_end - now, self._on_prefill_timer_cb)

    def _arm_decode_timer(self) -> None:
        """Decode until the nearest chunk boundary of a running call: one timer."""
        heap = self.heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        if not heap:
            return
        target = heap[0][0]
        if self.waiting and self._mid_iteration():  # wake at the iteration's end to admit them
            target = min(target, float(math.ceil(self.iters)))
        self.factor = self._decode_noise.draw()
        self.iterations_scheduled += 1
        u, v = self._iteration_terms()
        n = max(0.0, target - self.iters)
        # n iterations as the context grows: a series
        self._timer = _Wake(self.env, n * u + v * n * (n - 1) / 2, self._on_decode_timer_cb)
        self._decode_target = target

    def _on_prefill_timer(self, ev) -> None:
        if ev is self._timer:
            self._account(self.env.now)
            self._timer = None
            self._prefill_done()

    def _on_decode_timer(self, ev) -> None:
        if ev is self._timer:
            self._account(self.env.now)
            self._timer = None
            self._boundary(self._decode_target)

    def _push(self, call: SimCall) -> None:
        target = call.join_iter + call.ends[call.end_i] - 1
        self._tie += 1
        heapq.heappush(self.heap, (target, self._tie, call))

    def _prefill_done(self) -> None:
        now = self.env.now
        group, self.prefilling = self.prefilling, None
        self.last_t = now
        self._busy = True
        if self._mixed and self.batch:  # the decode iteration of the mixed step
            self.iters += 1
            self.context += len(self.batch)
        for call in group:
            if call.cancelled:
                self.running_tokens -= call.prompt_tokens + call.ends[-1]
                continue
            call.join_iter = self.iters
            call.last_end_s = now
            self.batch.add(call)
            self.context += call.prompt_tokens + 1
            self._push(call)
        self._process(now)
        self._busy = False
        self._reschedule()

    def _boundary(self, target: float) -> None:
        now = self.env.now
        n = target - self.iters
        if n > 0:
            self.context += len(self.batch) * n
            self.iters = target
        self.last_t = now
        self._busy = True
        self._process(now)
        self._busy = False
        self._reschedule()

    def _process(self, now: float) -> None:
        """Report every chunk boundary reached by ``self.iters`` (constant here: a cancel
        while reporting advances nothing, the clock stands still)."""
        heap, heappop, limit = self.heap, heapq.heappop, self.iters + EPS
        while heap and heap[0][0] <= limit:
            call = heappop(heap)[2]
            if call.cancelled:
                continue
            ends, i = call.ends, call.end_i
            end = ends[i]
            if call.reason is FAILED and i == len(ends) - 1:
                self._leave(call)
                call.driver.failed(call, f"injected failure after {call.tokens_before + end} tokens", now)
                continue
            if i == 0:
                call.driver.chunk(call, end, None, call.last_end_s, now)  # the prefill's end: it produced token 1
            else:
                first = call.last_end_s + self._iteration_terms()[0]
                call.driver.chunk(call, end - ends[i - 1], None, now if now < first else first, now)
            call.last_end_s = now
            if call.cancelled:
                continue
            i += 1
            call.end_i = i
            if i < len(ends):
                self._tie += 1
                heapq.heappush(heap, (call.join_iter + ends[i] - 1, self._tie, call))
            else:
                self._leave(call)
                call.driver.finished(call, call.reason, now)
