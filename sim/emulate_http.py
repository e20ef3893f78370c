"""The emulated fleet's HTTP side (aiohttp): vLLM's OpenAI-compatible routes per engine.

    POST /<engine>/v1/completions         streamed (SSE) or whole
    POST /<engine>/v1/chat/completions    the same, chat chunks
    GET  /<engine>/v1/models, /<engine>/health, /<engine>/metrics
    GET  /metrics                         every engine, an ``engine`` label on each line
    GET  /emulator/calls                  every call's timing so far (JSON)

Events are written by hand from templates (no JSON encoder per token): the emulator must
stay cheap beside the gateway it loads.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict

from staircase.errors import ConfigError

from .emulate import WORD, Clock, EmulatedEngine, Fleet, _Call

MAX_TOKENS_DEFAULT = 16


def _words(body: dict, chat: bool) -> list[str]:
    if chat:
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(content if isinstance(content, str) else "")
        return " ".join(parts).split()
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = " ".join(map(str, prompt))
    return str(prompt or "").split()


class _Events:
    """A call's event lines: the head once, then each event's changing parts."""

    def __init__(self, engine: str, model: str, call: int, chat: bool, usage_each: bool, prompt: int):
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.head = (f'data: {{"id":"cmpl-emu-{call}","object":"{kind}","created":{int(time.time())},'
                     f'"model":{json.dumps(model)},"choices":[{{"index":0,').encode()
        self.chat, self.usage_each, self.prompt = chat, usage_each, prompt
        self.first = True

    def event(self, tokens: int, total: int, finish: str | None, cached: int) -> bytes:
        text = (" " + WORD) * tokens
        if self.chat:
            role = '"role":"assistant",' if self.first else ""
            body = f'"delta":{{{role}"content":"{text}"}},'
        else:
            body = f'"text":"{text}",'
        fin = f'"{finish}"' if finish else "null"
        ids = ",".join(["1"] * tokens)
        tail = f'"logprobs":null,"finish_reason":{fin},"token_ids":[{ids}]}}]'
        if self.usage_each:
            details = f',"prompt_tokens_details":{{"cached_tokens":{cached}}}' if self.first else ""
            tail += (f',"usage":{{"prompt_tokens":{self.prompt},"total_tokens":{self.prompt + total},'
                     f'"completion_tokens":{total}{details}}}')
        self.first = False
        return self.head + body.encode() + tail.encode() + b"}\n\n"

    def usage(self, total: int, cached: int) -> bytes:
        head = self.head[:self.head.rindex(b'"choices"')]
        return head + (f'"choices":[],"usage":{{"prompt_tokens":{self.prompt},"total_tokens":{self.prompt + total},'
                       f'"completion_tokens":{total},"prompt_tokens_details":{{"cached_tokens":{cached}}}}}}}'
                       f'\n\n').encode()


class EmulatorApp:
    """The routes of one fleet."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/emulator/calls", self.calls)
        app.router.add_route("*", "/{path:.*}", self.engine_route)
        return app

    async def engine_route(self, request):
        from aiohttp import web

        name, sep, rest = request.path.lstrip("/").rpartition("/v1/")
        if not sep:
            name, _, rest = request.path.lstrip("/").rpartition("/")
            rest = "/" + rest
        engine = self.fleet.engines.get(name)
        if engine is None:
            known = ", ".join(list(self.fleet.engines)[:8])
            return _error(404, f"engine: got {name!r}; allowed: {known}{', ...' if len(self.fleet.engines) > 8 else ''}"
                               " (as /<engine>/v1/...)")
        if rest in ("completions", "chat/completions") and request.method == "POST":
            return await self.completion(request, engine, chat=rest != "completions")
        if rest == "models":
            return web.json_response({"object": "list", "data": [{"id": engine.model.name, "object": "model"}]})
        if rest == "/health":
            return web.Response(text="")
        if rest == "/metrics":
            return web.Response(text=_metrics([engine]), content_type="text/plain")
        return _error(404, f"path: got {request.path!r}; allowed: /<engine>/v1/completions, "
                           "/<engine>/v1/chat/completions, /<engine>/v1/models, /<engine>/health, /<engine>/metrics")

    async def completion(self, request, engine: EmulatedEngine, chat: bool):
        from aiohttp import web

        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body: not JSON")
        if not isinstance(body, dict):
            return _error(400, "body: not a JSON object")
        given = [body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
        max_tokens = given[0] if given else MAX_TOKENS_DEFAULT
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, f"max_tokens: got {max_tokens!r}; allowed: an integer >= 1")
        call = self.fleet.open_call(engine.name, request.headers.get("X-Request-Id", ""))
        engine.submit(call, _words(body, chat), max_tokens, self.fleet.stream_interval)
        options = body.get("stream_options") or {}
        events = _Events(engine.name, str(body.get("model") or engine.model.name), call.timing.call, chat,
                         bool(options.get("continuous_usage_stats")), call.timing.prompt_tokens)
        try:
            if not body.get("stream"):
                return await self._whole(call, chat, body)
            return await self._stream(request, call, events, bool(options.get("include_usage")))
        except ConnectionError:  # the client went away (a cancelled call): abort it, quietly
            call.timing.outcome = "aborted"
            engine.abort(call)
            return web.Response(status=499)  # (no one reads it)
        except asyncio.CancelledError:
            call.timing.outcome = "aborted"
            engine.abort(call)
            raise
        finally:
            if call.timing.outcome == "running":
                call.timing.outcome = "ok"
            engine.ended(call)

    async def _stream(self, request, call: _Call, events: _Events, usage: bool):
        from aiohttp import web

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        t, total = call.timing, 0
        while items := await call.next_tokens():
            last = call.done and not call.pending
            data = []
            for k, (tokens, due) in enumerate(items):
                total += tokens
                finish = "length" if last and k == len(items) - 1 else None
                data.append(events.event(tokens, total, finish, t.cached_tokens))
            await resp.write(b"".join(data))
            sent = time.monotonic()
            if t.output_tokens == 0:
                t.first_due_s, t.first_sent_s = items[0][1], sent
            t.last_due_s, t.last_sent_s, t.output_tokens = items[-1][1], sent, total
            if t.writes is not None:  # (floats in an array: nothing for the garbage collector to walk)
                t.writes.extend((sent, total))
        if usage:
            await resp.write(events.usage(total, t.cached_tokens))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _whole(self, call: _Call, chat: bool, body: dict):
        from aiohttp import web

        t, total = call.timing, 0
        while items := await call.next_tokens():
            total += sum(n for n, _ in items)
            if t.output_tokens == 0:
                t.first_due_s = t.first_sent_s = items[0][1]
            t.last_due_s, t.output_tokens = items[-1][1], total
        t.last_sent_s = time.monotonic()
        text = (" " + WORD) * total
        choice = {"index": 0, "finish_reason": "length",
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        return web.json_response({"id": f"cmpl-emu-{t.call}", "object": "chat.completion" if chat else "text_completion",
                                  "created": int(time.time()), "model": body.get("model"), "choices": [choice],
                                  "usage": {"prompt_tokens": t.prompt_tokens, "completion_tokens": total,
                                            "total_tokens": t.prompt_tokens + total,
                                            "prompt_tokens_details": {"cached_tokens": t.cached_tokens}}})

    async def metrics(self, _request):
        from aiohttp import web

        return web.Response(text=_metrics(list(self.fleet.engines.values())), content_type="text/plain")

    async def calls(self, request):
        """Every call's timing; ``?since=N``: from call N on; ``?clear=1``: then forget
        them (a benchmark's load points one after another)."""
        from aiohttp import web

        since = int(request.query.get("since", 0))
        calls = [asdict(c) | ({"writes": c.writes.tolist()} if c.writes is not None else {})
                 for c in self.fleet.calls[since:]]
        body = {"lag_s_max": self.fleet.clock.lag_s_max, "calls": calls}
        if request.query.get("clear"):
            self.fleet.calls = [c for c in self.fleet.calls if c.outcome == "running"]
            self.fleet.clock.lag_s_max = 0.0
        return web.json_response(body)


def _error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                             status=status)


METRICS = (  # vLLM's names: (name, type, help, value of an engine)
    ("vllm:num_requests_running", "gauge", "requests in the running batch",
     lambda e: len(e.sim.batch) + len(e.sim.prefilling or ())),
    ("vllm:num_requests_waiting", "gauge", "requests waiting to be admitted", lambda e: len(e.sim.waiting)),
    ("vllm:kv_cache_usage_perc", "gauge", "fraction of the KV cache the running requests hold",
     lambda e: e.sim.running_tokens / max(1, e.model.kv_cache_tokens)),
    ("vllm:prefix_cache_queries_total", "counter", "prompt tokens looked up in the prefix cache",
     lambda e: e.cache_queries),
    ("vllm:prefix_cache_hits_total", "counter", "prompt tokens found in the prefix cache", lambda e: e.cache_hits),
    ("vllm:prompt_tokens_total", "counter", "prompt tokens of ended requests", lambda e: e.prompt_tokens),
    ("vllm:generation_tokens_total", "counter", "tokens generated by ended requests", lambda e: e.generation_tokens),
    ("vllm:request_success_total", "counter", "requests that ended with their answer", lambda e: e.requests_ok),
)


def _metrics(engines: list[EmulatedEngine]) -> str:
    lines = []
    for name, kind, text, value in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{engine="{e.name}",model_name="{e.model.name}"}} {value(e)}' for e in engines]
    return "\n".join(lines) + "\n"


async def serve_fleet(fleet_of, host: str = "127.0.0.1", port: int = 8100):
    """Start the fleet's server (``fleet_of(clock)`` builds the fleet on this loop's
    clock); returns (fleet, aiohttp runner): ``await runner.cleanup()`` stops it."""
    from aiohttp import web

    fleet = fleet_of(Clock(asyncio.get_running_loop()))
    runner = web.AppRunner(EmulatorApp(fleet).app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError("port", port, f"a free port on {host} ({err.strerror})") from None
    return fleet, runner
