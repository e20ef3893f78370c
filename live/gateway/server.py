"""``staircase serve``'s core: the live runner behind an OpenAI-compatible front door.

``StaircaseServer`` admits a chat-completion request (its policy, query, answer budget
and sampling, or an ``ApiError``), runs it with the live runner's ``run_request``
(the same driver, policies, routers, watchdog and engines as ``staircase live``), and
hands the answer's deltas to the HTTP layer as they arrive (``Stream``). A bounded
number of requests run at once: past ``max_in_flight`` a request is refused with 429
and ``Retry-After`` instead of queueing without bound. ``shutdown`` stops admitting,
gives the requests in flight ``grace_s`` to end, cancels the rest (every call of
theirs on every engine) and writes the rows. The HTTP routes are in ``staircase.live.gateway.app``.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import time
from dataclasses import dataclass, replace

from staircase.errors import ConfigError
from staircase.policies import Policy
from staircase.trace import RequestRow

from ..engines import Sampling
from .rowlog import RowLog
from ..runner import LiveRunner
from .api import ApiError, ChatCompletionRequest, check_honoured, conversation_query, stop_strings
from .metrics import ServerMetrics


@dataclass(frozen=True)
class ServeSettings:
    """``model_name``: what clients name in ``model``; ``max_in_flight``: requests run at
    once before 429; ``answer_tokens``: the answer's budget when a request names none
    (None: the runner's ``max_tokens``), at most ``max_answer_tokens``; ``grace_s``: how
    long a stop waits for requests in flight; ``flush_s``: how often rows are written;
    ``api_key``: required as ``Authorization: Bearer <key>`` when set (never logged)."""

    model_name: str = "staircase"
    max_in_flight: int = 32
    answer_tokens: int | None = None
    max_answer_tokens: int = 2048
    grace_s: float = 30.0
    flush_s: float = 5.0
    api_key: str | None = None
    retry_after_s: int = 1

    def __post_init__(self):
        for name, low in (("max_in_flight", 1), ("max_answer_tokens", 1), ("retry_after_s", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(name.replace("_", "-"), value, f"an integer >= {low}")
        for name in ("grace_s", "flush_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(name.replace("_", "-"), value, "a number of seconds > 0")
        if self.answer_tokens is not None and not 1 <= self.answer_tokens <= self.max_answer_tokens:
            raise ConfigError("answer-tokens", self.answer_tokens, f"an integer in 1..{self.max_answer_tokens}")


@dataclass
class Job:
    """One admitted request."""

    id: int
    policy: Policy
    query: str
    answer_tokens: int
    sampling: Sampling
    model: str
    stops: tuple[str, ...] = ()


class Stream:
    """A request's listener (``LiveRunner.run_request``): the answer's deltas queued for
    the HTTP layer (None once the request ended), and the inter-token metric."""

    def __init__(self, server: "StaircaseServer", job: Job):
        self.server, self.job = server, job
        self.queue: asyncio.Queue = asyncio.Queue()
        self.last_s: float | None = None
        self.row: RequestRow | None = None
        self.error: str | None = None

    def text(self, text: str, tokens: int, t: float) -> None:
        if self.last_s is not None:
            self.server.metrics.delta(self.job.policy.name, t - self.last_s, tokens)
        self.last_s = t
        self.queue.put_nowait((text, tokens))

    def broke(self, err: Exception) -> None:
        """The run itself raised (a bug, never an engine's failure): the stream ends with it."""
        self.error = f"internal error ({type(err).__name__})"
        self.queue.put_nowait(None)

    def ended(self, row: RequestRow) -> None:
        self.row = row
        self.server.metrics.ended(row)
        if not self.server.accepting:  # ended after the stop signal: how the stop went
            kind = "ok" if row.outcome == "ok" else "cancelled" if row.error.startswith("cancelled") else "error"
            self.server.after_stop[kind] += 1
        self.queue.put_nowait(None)


class StaircaseServer:
    def __init__(self, runner: LiveRunner, policies: list[Policy], settings: ServeSettings | None = None,
                 rowlog: RowLog | None = None, worker: tuple[int, int] | None = None):
        """``worker``: (k, n) under ``staircase serve --workers n``: ids k, k + n, ...
        (unique over the workers) and metrics in prometheus' multiprocess files."""
        if not policies:
            raise ConfigError("policies", [], "at least one policy to serve")
        for policy in policies:
            policy.validate_for(runner.topology)
            runner.check_sessions(policy)
        self.runner, self.settings, self.rowlog = runner, settings or ServeSettings(), rowlog
        self.policies = {p.name: p for p in policies}
        self.default = policies[0]
        self.metrics = ServerMetrics(runner, multiprocess=worker is not None)
        self.in_flight = 0
        self.accepting = False
        self.in_flight_at_stop: int | None = None
        self.failed: Exception | None = None  # why the engines did not start
        self.after_stop = {"ok": 0, "error": 0, "cancelled": 0}
        self.tasks: set[asyncio.Task] = set()
        self.ids = itertools.count(*worker) if worker is not None else itertools.count()
        self.created = int(time.time())

    @property
    def model_names(self) -> list[str]:
        """What ``model`` may name: the served name, then each policy's."""
        return [self.settings.model_name, *self.policies]

    # ------------------------------------------------------------------ admission
    def check_key(self, authorization: str | None) -> None:
        key = self.settings.api_key
        if key and not hmac.compare_digest((authorization or "").encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "a valid API key as 'Authorization: Bearer <key>' is required", "authorization")

    def admit(self, body: ChatCompletionRequest) -> Job:
        """The request's job, counted in flight; an ``ApiError`` (nothing counted) if it
        cannot run: a bad field, or no room (429), or the server stopping (503)."""
        if not self.accepting:
            self.metrics.refused.labels("stopping").inc()
            raise ApiError(503, "the server is stopping; no new requests", headers={"Retry-After": "5"})
        check_honoured(body)
        policy = self._policy(body)
        answer = body.max_completion_tokens or body.max_tokens or self.settings.answer_tokens \
            or self.runner.max_tokens
        if answer > self.settings.max_answer_tokens:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{field}: got {answer}; allowed: 1..{self.settings.max_answer_tokens} "
                                f"(this server's --max-answer-tokens)", field)
        query = conversation_query(body.messages)
        if self.in_flight >= self.settings.max_in_flight:
            self.metrics.refused.labels("overload").inc()
            raise ApiError(429, f"{self.in_flight} requests in flight, this server's bound "
                                f"(--max-in-flight {self.settings.max_in_flight}); retry later",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        return Job(next(self.ids), policy, query, min(answer, self.settings.max_answer_tokens),
                   self._sampling(body), body.model, stop_strings(body))

    def _policy(self, body: ChatCompletionRequest) -> Policy:
        if body.model not in self.model_names:
            raise ApiError(404, f"model: got {body.model!r}; allowed: {', '.join(self.model_names)}", "model")
        name = body.policy or (body.model if body.model in self.policies else self.default.name)
        if name not in self.policies:
            raise ApiError(400, f"policy: got {name!r}; allowed: {', '.join(self.policies)}", "policy")
        return self.policies[name]

    def _sampling(self, body: ChatCompletionRequest) -> Sampling:
        s = self.runner.sampling
        return replace(s, temperature=s.temperature if body.temperature is None else body.temperature,
                       top_p=s.top_p if body.top_p is None else body.top_p,
                       seed=s.seed if body.seed is None else body.seed % 2**31,
                       ignore_eos=body.ignore_eos or s.ignore_eos)

    # ------------------------------------------------------------------------ runs
    def start(self, job: Job) -> tuple[asyncio.Task, Stream]:
        """Run an admitted job; its task returns the request's row."""
        stream = Stream(self, job)
        task = asyncio.create_task(self._run(job, stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task, stream

    async def _run(self, job: Job, stream: Stream) -> RequestRow:
        try:
            return await self.runner.run_request(job.policy, job.id, job.query, final_max_tokens=job.answer_tokens,
                                                 sampling=job.sampling, listener=stream)
        except Exception as err:
            stream.broke(err)
            raise
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    async def startup(self) -> None:
        await self.runner.start()
        self.accepting = True

    async def flush_every(self) -> None:
        """Write the finished requests' rows every ``flush_s`` (a task of the app's life)."""
        while True:
            await asyncio.sleep(self.settings.flush_s)
            if self.rowlog is not None:
                await self.rowlog.flush_async()

    async def sample_every(self, period_s: float = 1.0) -> None:
        """The calls in flight per engine into the workers' shared gauge (multiprocess)."""
        while True:
            self.metrics.sample_engines()
            await asyncio.sleep(period_s)

    def stop_admitting(self) -> None:
        """New requests get 503 from now on (a stop signal's first step)."""
        if self.in_flight_at_stop is None:
            self.in_flight_at_stop = self.in_flight
        self.accepting = False

    async def shutdown(self) -> dict:
        """Stop admitting; wait up to ``grace_s`` for the requests in flight, cancel the
        rest; write every row; close the engines. Returns how the requests in flight at
        the stop ended (``ok``, ``error``, ``cancelled``)."""
        self.stop_admitting()
        pending = set(self.tasks)
        if pending:
            await asyncio.wait(pending, timeout=self.settings.grace_s)
        late = [t for t in pending if not t.done()]
        for task in late:
            task.cancel("server stopping")
        await asyncio.gather(*late, return_exceptions=True)
        summary = {"in_flight_at_stop": self.in_flight_at_stop, **self.after_stop}
        if self.rowlog is not None:
            self.rowlog.flush(stopped=summary)
        await self.runner.close()
        return summary
