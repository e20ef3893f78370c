"""Slow or dead? When a silent streaming call counts as lost.

A call is silent in two ways: before its first token (queueing and prefill) and
between tokens once it streams. Neither silence alone says the engine is dead: a
slow CPU prefills a long prompt for many seconds, and a call queued behind others
hears nothing while its engine works for them. So the verdict is about the
engine, not the call:

- an engine is *alive* while it delivers tokens to any call, or while a call of its
  waits for its first token within that call's first-token limit;
- a call is lost only when its engine has been quiet for longer than the limits of
  everything it has in flight explain, i.e. ``now`` is past
  ``max(last delta on the engine + gap limit, sent + first-token limit of each call still
  waiting for its first token)``;
- the final node (the answer the user reads) has no redundancy behind it: at that
  point its engine is asked whether it is healthy (the in-process engine's state, a
  server's ``/health``) and, if so, the wait goes on for another limit; the request
  timeout remains the backstop.

Limits follow the engine's own pace unless set (``StallLimits``): the gap limit is
``multiple`` times the 95th percentile of the gaps between deltas seen on that engine
(``gap_floor_s`` at least); the first-token limit is ``multiple`` times the slowest
first-token wait per prompt token seen on that engine times this prompt's tokens
(``first_token_floor_s`` plus ``floor_s_per_prompt_token`` per token at least, which
also covers an engine's first call, before anything was seen). Every loss keeps its
reason: ``no first token in Ns`` or ``stalled Ns``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass

from staircase.errors import ConfigError

from .engines import EngineError


@dataclass(frozen=True)
class StallLimits:
    """When a silent call is lost. ``None`` limits follow the engine's observed pace."""

    first_token_s: float | None = None  # fixed limit of engine silence before a call's first token
    gap_s: float | None = None  # fixed limit of engine silence between tokens
    multiple: float = 8.0  # adaptive limits: this many times the engine's observed pace
    gap_floor_s: float = 10.0
    first_token_floor_s: float = 60.0
    floor_s_per_prompt_token: float = 0.1  # the first-token floor grows with the prompt (10 tokens/s)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value is not None and not value > 0:
                raise ConfigError(name, value, "a number of seconds > 0 (or leave it unset: adaptive)"
                                  if name in ("first_token_s", "gap_s") else "a number > 0")

    def describe(self) -> dict:
        return asdict(self)


def _p95(values) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


class EnginePace:
    """What one engine has shown: gaps between a call's deltas, first-token waits per
    prompt token, when it last delivered anything, and the calls it has in flight."""

    def __init__(self, limits: StallLimits, window: int = 512):
        self.limits = limits
        self.gaps: deque[float] = deque(maxlen=window)
        self.first_wait_per_token: deque[float] = deque(maxlen=window)
        self.last_delta_s: float | None = None
        self.waiting: dict[int, float] = {}  # call id -> deadline of its first token

    def gap_limit(self) -> float:
        lim = self.limits
        if lim.gap_s is not None:
            return lim.gap_s
        return max(lim.gap_floor_s, lim.multiple * _p95(self.gaps)) if self.gaps else lim.gap_floor_s

    def first_token_limit(self, prompt_tokens: int) -> float:
        lim = self.limits
        if lim.first_token_s is not None:
            return lim.first_token_s
        floor = lim.first_token_floor_s + lim.floor_s_per_prompt_token * max(prompt_tokens, 0)
        if not self.first_wait_per_token:
            return floor
        return max(floor, lim.multiple * max(self.first_wait_per_token) * max(prompt_tokens, 1))

    def deadline(self) -> float:
        """When the engine's quiet stops being explained by its work in flight."""
        return self._deadline(self.gap_limit)

    def earliest_deadline(self) -> float:
        """A lower bound of ``deadline()`` without the gaps' percentile (an adaptive gap
        limit is never below its floor): what a call waits on between deltas."""
        lim = self.limits
        return self._deadline(lambda: lim.gap_s if lim.gap_s is not None else lim.gap_floor_s)

    def _deadline(self, gap_limit) -> float:
        ends = list(self.waiting.values())
        if self.last_delta_s is not None:
            ends.append(self.last_delta_s + gap_limit())
        return max(ends) if ends else float("-inf")


def _retrieve(task: asyncio.Future) -> None:
    """Read a finished task's outcome, so that an error it ends with after we stopped
    waiting (an engine shut down on Ctrl-C) is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


class CallWatch:
    """One streaming call under its engine's pace."""

    def __init__(self, pace: EnginePace, prompt_tokens: int, *, final: bool, healthy=None):
        self.pace = pace
        self.prompt_tokens = prompt_tokens
        self.final = final
        self.healthy = healthy  # async () -> bool, asked for the final node before giving up
        self.sent_s = time.monotonic()
        self.last_s: float | None = None  # this call's last delta
        self.grace_until = float("-inf")  # the final node's extension after a health check
        self.limit_s = pace.first_token_limit(prompt_tokens)
        pace.waiting[id(self)] = self.sent_s + self.limit_s
        self._pump: _Pump | None = None

    def on_delta(self, tokens: int, prompt_tokens: int | None) -> None:
        if prompt_tokens:
            self.prompt_tokens = prompt_tokens  # the engine's own count beats the layout's estimate
        if not tokens:
            return
        now = time.monotonic()
        pace = self.pace
        if self.last_s is None:
            pace.waiting.pop(id(self), None)
            pace.first_wait_per_token.append((now - self.sent_s) / max(self.prompt_tokens, 1))
        else:
            pace.gaps.append(now - self.last_s)
        self.last_s = now
        pace.last_delta_s = now

    def close(self) -> None:
        self.pace.waiting.pop(id(self), None)
        if self._pump is not None:
            self._pump.task.cancel()  # (``stop`` waits for it)

    def reason(self) -> str:
        if self.last_s is None:
            return f"no first token in {self.pace.first_token_limit(self.prompt_tokens):.3g}s"
        return f"stalled {self.pace.gap_limit():.3g}s"

    async def next(self, stream):
        """The stream's next delta, or EngineError when the engine looks dead. The stream
        is read by a task of its own (``_Pump``) from the first call on, so a delta that
        is there already costs no wait, and one that is not costs one future and one timer
        (not a task and an ``asyncio.wait`` per delta: the gateway's hot path at scale)."""
        pump = self._pump
        if pump is None:
            pump = self._pump = _Pump(stream)
        while True:
            if pump.buf:
                return pump.take()
            now = time.monotonic()
            deadline = max(self.pace.earliest_deadline(), self.grace_until)  # cheap: no percentile per delta
            if deadline <= now:  # quiet that long: is the engine's exact deadline past too?
                deadline = max(self.pace.deadline(), self.grace_until)
            if deadline > now:
                await pump.wait(deadline - now)
                continue  # a delta came, or the deadline may have moved: the engine delivered to others
            if pump.buf:
                continue
            if self.final and self.healthy is not None and await self.healthy():
                self.grace_until = time.monotonic() + max(self.pace.gap_limit(),
                                                         self.pace.first_token_limit(self.prompt_tokens)
                                                         if self.last_s is None else 0.0)
                continue
            raise EngineError(self.reason())

    async def stop(self) -> None:
        """Stop reading the stream (before it is closed: an async generator a task still
        runs cannot be)."""
        if self._pump is not None:
            await self._pump.stop()


_END = object()


class _Pump:
    """Reads one stream into a buffer from a task of its own; the stream's end or error
    is the buffer's last item."""

    __slots__ = ("buf", "waiter", "task")

    def __init__(self, stream):
        self.buf: deque = deque()
        self.waiter: asyncio.Future | None = None
        self.task = asyncio.ensure_future(self._run(stream))
        self.task.add_done_callback(_retrieve)

    async def _run(self, stream) -> None:
        try:
            async for delta in stream:
                self.buf.append(delta)
                self._wake()
            self.buf.append(_END)
        except Exception as err:  # (an EngineError, or a bug of the stream's: raised to the reader)
            self.buf.append(err)
        finally:
            self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def take(self):
        item = self.buf.popleft()
        if item is _END:
            self.buf.appendleft(_END)  # (the end stays the end)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def wait(self, timeout_s: float) -> None:
        """Until the next item, or ``timeout_s``."""
        loop = asyncio.get_running_loop()
        self.waiter = w = loop.create_future()
        timer = loop.call_later(timeout_s, _set_none, w)
        try:
            await w
        finally:
            timer.cancel()
            self.waiter = None

    async def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def _set_none(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
